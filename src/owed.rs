//! Invalidations the store still owes: a write whose response went out
//! before its invalidation was applied (the store was slow, down, or the
//! write's budget ran out) leaves a debt here until the background queue
//! applies it.
//!
//! While a debt is open, this process serves no entry generated before the
//! write it stands for: such an entry may hold what the write replaced. The
//! entry is treated as missing, rebuilt and stored again (the new one is
//! generated after the write, so it is served). A debt the queue gives up
//! on is written off into a floor that never goes down: entries generated
//! before it are rebuilt when next asked for. So a lost invalidation costs
//! a rebuild, never a stale read in this process.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Open debts kept at most; past it the oldest is written off.
pub(crate) const OWED_CAPACITY: usize = 10_000;

/// Entries generated this long after an open debt's write are not served
/// either: clocks of the processes that share the store may differ by this
/// much.
pub(crate) const CLOCK_MARGIN_MS: u64 = 100;

/// One open debt: when its write happened and a tie-breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Debt {
    since_ms: u64,
    id: u64,
}

/// The ledger of open debts.
#[derive(Debug)]
pub(crate) struct Owed {
    book: Mutex<Book>,
    /// Entries generated before this (ms since the epoch, margin included)
    /// are not served; 0 when nothing is owed.
    distrust_before_ms: AtomicU64,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Book {
    next_id: u64,
    open: BTreeSet<Debt>,
    floor_ms: u64,
}

impl Book {
    fn threshold(&self) -> u64 {
        let newest = self.open.last().map_or(0, |debt| debt.since_ms);
        let since = newest.max(self.floor_ms);
        if since == 0 {
            0
        } else {
            since.saturating_add(CLOCK_MARGIN_MS)
        }
    }
}

impl Owed {
    pub(crate) fn new(capacity: usize) -> Owed {
        Owed {
            book: Mutex::new(Book::default()),
            distrust_before_ms: AtomicU64::new(0),
            capacity: capacity.max(1),
        }
    }

    /// Opens a debt for a write made at `since_ms`.
    pub(crate) fn owe(&self, since_ms: u64) -> Debt {
        self.update(|book, capacity| {
            book.next_id += 1;
            let debt = Debt {
                since_ms: since_ms.max(1),
                id: book.next_id,
            };
            if book.open.len() >= capacity {
                if let Some(oldest) = book.open.pop_first() {
                    book.floor_ms = book.floor_ms.max(oldest.since_ms);
                }
            }
            book.open.insert(debt);
            debt
        })
    }

    /// The debt was applied.
    pub(crate) fn pay(&self, debt: Debt) {
        self.update(|book, _| {
            book.open.remove(&debt);
        });
    }

    /// The debt will not be applied: entries generated before its write
    /// are never served again by this process.
    pub(crate) fn write_off(&self, debt: Debt) {
        self.update(|book, _| {
            if book.open.remove(&debt) {
                book.floor_ms = book.floor_ms.max(debt.since_ms);
            }
        });
    }

    /// Open debts.
    pub(crate) fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// Whether an entry generated at `generated_ms` may be served.
    pub(crate) fn trusts(&self, generated_ms: u64) -> bool {
        generated_ms >= self.distrust_before_ms.load(Ordering::Acquire)
    }

    fn update<T>(&self, change: impl FnOnce(&mut Book, usize) -> T) -> T {
        let mut book = self.lock();
        let out = change(&mut book, self.capacity);
        self.distrust_before_ms
            .store(book.threshold(), Ordering::Release);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = CLOCK_MARGIN_MS;

    #[test]
    fn nothing_owed_trusts_everything() {
        let owed = Owed::new(10);
        assert!(owed.trusts(0));
        assert!(owed.trusts(1));
    }

    #[test]
    fn the_newest_open_debt_decides_and_paying_it_lowers_the_bar() {
        let owed = Owed::new(10);
        let old = owed.owe(10_000);
        let new = owed.owe(20_000);
        assert!(!owed.trusts(15_000), "older than the newest debt's write");
        assert!(!owed.trusts(20_000 + M - 1), "within the clock margin");
        assert!(owed.trusts(20_000 + M));
        owed.pay(new);
        assert!(owed.trusts(15_000 + M));
        assert!(!owed.trusts(10_000));
        owed.pay(old);
        assert!(owed.trusts(0));
        assert_eq!(owed.len(), 0);
    }

    #[test]
    fn written_off_and_overflowing_debts_leave_a_floor() {
        let owed = Owed::new(2);
        let a = owed.owe(5_000);
        owed.write_off(a);
        assert_eq!(owed.len(), 0);
        assert!(!owed.trusts(5_000));
        assert!(owed.trusts(5_000 + M));

        let owed = Owed::new(2);
        let _b = owed.owe(1_000);
        let c = owed.owe(2_000);
        let d = owed.owe(3_000); // pushes `_b` out into the floor
        assert_eq!(owed.len(), 2);
        owed.pay(c);
        owed.pay(d);
        assert!(!owed.trusts(1_000), "the overflowed debt still counts");
        assert!(owed.trusts(1_000 + M));
    }
}
