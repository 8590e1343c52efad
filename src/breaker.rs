//! A circuit breaker for the store: after a run of consecutive failures it
//! opens, and store calls are skipped (they fail at once, without touching
//! the network) for a cool-down; then one call, the probe, is let through.
//! A probe that succeeds closes the breaker; one that fails opens it for
//! another cool-down.
//!
//! The closed path costs one atomic load before the call and, after it, one
//! load (and a store only when there were failures to forget).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Consecutive failed store calls that open the breaker, by default.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;

/// How long an open breaker skips the store before a probe, by default.
pub const DEFAULT_BREAKER_COOL_DOWN: Duration = Duration::from_secs(1);

/// Whether a store call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Closed: call the store.
    Call,
    /// Open and cooled down: this call is the one probe.
    Probe,
    /// Open: do not call the store.
    Skip,
}

/// What a finished call did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    Stayed,
    /// This call's failure opened the breaker.
    Opened,
    /// This probe's success closed it.
    Closed,
}

/// The breaker's state, shared by every call of one layer.
#[derive(Debug)]
pub(crate) struct Breaker {
    /// Consecutive failures that open it; 0 turns the breaker off.
    threshold: u32,
    cool_down: Duration,
    failures: AtomicU32,
    /// The fast path: `false` while closed.
    open: AtomicBool,
    tripped: Mutex<Tripped>,
    opened: AtomicU64,
    skipped: AtomicU64,
}

#[derive(Debug)]
struct Tripped {
    /// No probe before this.
    until: Option<Instant>,
    /// A probe is out.
    probing: bool,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cool_down: Duration) -> Breaker {
        Breaker {
            threshold,
            cool_down,
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            tripped: Mutex::new(Tripped {
                until: None,
                probing: false,
            }),
            opened: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// The cool-down of an open breaker.
    pub(crate) fn cool_down(&self) -> Duration {
        self.cool_down
    }

    /// True while the breaker is open (the store is being skipped, or one
    /// probe is out).
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Times the breaker opened.
    pub(crate) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Store calls skipped because the breaker was open.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Whether a call may go to the store now.
    pub(crate) fn admit(&self) -> Admission {
        if !self.is_open() {
            return Admission::Call;
        }
        let mut tripped = self.lock();
        let cooled = tripped.until.is_none_or(|until| Instant::now() >= until);
        if !self.is_open() {
            Admission::Call
        } else if cooled && !tripped.probing {
            tripped.probing = true;
            Admission::Probe
        } else {
            drop(tripped);
            self.skipped.fetch_add(1, Ordering::Relaxed);
            Admission::Skip
        }
    }

    /// Records how an admitted call went: `healthy` when the store answered
    /// (an error reply is an answer), not when it timed out or could not be
    /// reached.
    pub(crate) fn record(&self, admission: Admission, healthy: bool) -> Turn {
        match (admission, healthy) {
            (Admission::Skip, _) => Turn::Stayed,
            (Admission::Call, true) => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                Turn::Stayed
            }
            (Admission::Call, false) => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if self.threshold == 0 || failures < self.threshold || self.is_open() {
                    return Turn::Stayed;
                }
                let mut tripped = self.lock();
                if self.is_open() {
                    return Turn::Stayed;
                }
                tripped.until = Some(Instant::now() + self.cool_down);
                tripped.probing = false;
                self.open.store(true, Ordering::Release);
                self.opened.fetch_add(1, Ordering::Relaxed);
                Turn::Opened
            }
            (Admission::Probe, true) => {
                let mut tripped = self.lock();
                tripped.probing = false;
                tripped.until = None;
                self.failures.store(0, Ordering::Relaxed);
                self.open.store(false, Ordering::Release);
                Turn::Closed
            }
            (Admission::Probe, false) => {
                let mut tripped = self.lock();
                tripped.probing = false;
                tripped.until = Some(Instant::now() + self.cool_down);
                Turn::Stayed
            }
        }
    }

    /// Claims the probe now, cool-down or not, unless one is out: for a
    /// caller that cannot wait the cool-down out (the invalidation queue,
    /// holding what writes could not apply while the store was sick). The
    /// caller must [`record`](Self::record) the probe, or
    /// [`abandon`](Self::abandon) it.
    pub(crate) fn claim_probe(&self) -> bool {
        if !self.is_open() {
            return false;
        }
        let mut tripped = self.lock();
        if tripped.probing || !self.is_open() {
            return false;
        }
        tripped.probing = true;
        true
    }

    /// A probe ended without an answer either way (its call was dropped):
    /// the next call may probe at once.
    pub(crate) fn abandon(&self, admission: Admission) {
        if admission == Admission::Probe {
            self.lock().probing = false;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tripped> {
        self.tripped.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_probes_once_per_cool_down() {
        let breaker = Breaker::new(3, Duration::from_secs(1));
        for _ in 0..2 {
            assert_eq!(breaker.admit(), Admission::Call);
            assert_eq!(breaker.record(Admission::Call, false), Turn::Stayed);
        }
        // A success forgets the failures so far.
        assert_eq!(breaker.record(Admission::Call, true), Turn::Stayed);
        for _ in 0..2 {
            breaker.record(Admission::Call, false);
        }
        assert!(!breaker.is_open());
        assert_eq!(breaker.record(Admission::Call, false), Turn::Opened);
        assert!(breaker.is_open());
        assert_eq!(breaker.opened(), 1);

        // Open: skipped until the cool-down is over.
        assert_eq!(breaker.admit(), Admission::Skip);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(breaker.admit(), Admission::Skip);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(breaker.admit(), Admission::Probe);
        // One probe at a time.
        assert_eq!(breaker.admit(), Admission::Skip);
        // A failed probe: another cool-down.
        assert_eq!(breaker.record(Admission::Probe, false), Turn::Stayed);
        assert_eq!(breaker.admit(), Admission::Skip);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(breaker.admit(), Admission::Probe);
        assert_eq!(breaker.record(Admission::Probe, true), Turn::Closed);
        assert!(!breaker.is_open());
        assert_eq!(breaker.admit(), Admission::Call);
        assert_eq!(breaker.skipped(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_may_be_claimed_before_the_cool_down_ends() {
        let breaker = Breaker::new(1, Duration::from_secs(60));
        assert!(!breaker.claim_probe(), "closed: nothing to probe");
        assert_eq!(breaker.record(Admission::Call, false), Turn::Opened);
        assert_eq!(breaker.admit(), Admission::Skip);
        assert!(breaker.claim_probe());
        // One probe at a time, claimed or admitted.
        assert!(!breaker.claim_probe());
        assert_eq!(breaker.admit(), Admission::Skip);
        assert_eq!(breaker.record(Admission::Probe, true), Turn::Closed);
        assert_eq!(breaker.admit(), Admission::Call);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_lets_the_next_call_probe() {
        let breaker = Breaker::new(1, Duration::from_secs(1));
        assert_eq!(breaker.record(Admission::Call, false), Turn::Opened);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(breaker.admit(), Admission::Probe);
        breaker.abandon(Admission::Probe);
        assert_eq!(breaker.admit(), Admission::Probe);
    }

    #[tokio::test]
    async fn a_threshold_of_zero_never_opens() {
        let breaker = Breaker::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            assert_eq!(breaker.record(Admission::Call, false), Turn::Stayed);
        }
        assert_eq!(breaker.admit(), Admission::Call);
    }
}
