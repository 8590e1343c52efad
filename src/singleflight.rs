//! One generic in-process single flight: one leader per key does the work,
//! every other request for that key awaits its result in memory. Used for
//! rebuilds (the value is how the rebuild landed) and for
//! store reads (the value is what the read found).
//!
//! The leader holds a [`Lead`]; the others hold a [`Wait`] on the same
//! flight. The leader ends the flight by [`Lead::land`]ing a value. A `Lead`
//! dropped without landing (its task was aborted, or it panicked) ends the
//! flight too: the waiters see [`Waited::Retry`] and try again, one of them
//! becoming the next leader, instead of hanging (moka's `WaiterGuard` works
//! the same way).
//!
//! Each flight remembers the *epoch* it started in. A request may join only
//! a flight that started in its own epoch or later: when a write of this
//! process finishes, the layer moves the epoch on, and requests that arrive
//! after it start a new flight instead of joining one that may have read
//! data from before the write.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

/// What the waiters of a flight see.
#[derive(Debug, Clone)]
struct State<T> {
    landed: Option<T>,
    /// The leader waits for something bounded on its own (another
    /// process's rebuild): the waiters do not time out meanwhile.
    leader_waits: bool,
}

struct Slot<T> {
    rx: watch::Receiver<State<T>>,
    epoch: u64,
    /// A background refresh (the entry is still served meanwhile).
    refresh: bool,
}

impl<T> Slot<T> {
    /// The leader is still there (or landed and the slot is on its way out).
    fn live(&self) -> bool {
        self.rx.has_changed().is_ok()
    }
}

/// The flights of one layer, keyed by cache key. Bounded: past `capacity`
/// running flights, new keys get no flight (their requests go on alone).
pub(crate) struct SingleFlight<T> {
    running: Mutex<HashMap<Arc<str>, Slot<T>>>,
    capacity: usize,
}

impl<T> fmt::Debug for SingleFlight<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFlight")
            .field("running", &self.lock().len())
            .finish()
    }
}

/// The role a request got for its key.
pub(crate) enum Role<T> {
    Leader(Lead<T>),
    Waiter(Wait<T>),
    /// Too many flights run: go on alone.
    Full,
}

impl<T> SingleFlight<T> {
    /// A single flight of at most `capacity` running flights.
    pub(crate) fn new(capacity: usize) -> Self {
        SingleFlight {
            running: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Slot<T>>> {
        // Nothing is left half-done under this lock: recover from poison.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T: Clone> SingleFlight<T> {
    /// Leads the flight for `key`, or waits on the one that runs, if it
    /// started in `epoch` or later.
    pub(crate) fn join(self: &Arc<Self>, key: &Arc<str>, epoch: u64) -> Role<T> {
        self.join_unless(key, epoch, None)
    }

    /// Like [`join`](Self::join), but the flight `gave_up` is not joined
    /// again: it is replaced, and its waiters' relief leader is this
    /// request (after a wait ran out).
    pub(crate) fn take_over(
        self: &Arc<Self>,
        key: &Arc<str>,
        epoch: u64,
        gave_up: &Wait<T>,
    ) -> Role<T> {
        self.join_unless(key, epoch, Some(&gave_up.rx))
    }

    fn join_unless(
        self: &Arc<Self>,
        key: &Arc<str>,
        epoch: u64,
        not: Option<&watch::Receiver<State<T>>>,
    ) -> Role<T> {
        let mut running = self.lock();
        if let Some(slot) = running.get(key) {
            let excluded = not.is_some_and(|rx| rx.same_channel(&slot.rx));
            if slot.live() && slot.epoch >= epoch && !excluded {
                return Role::Waiter(Wait {
                    rx: slot.rx.clone(),
                });
            }
        } else if running.len() >= self.capacity {
            return Role::Full;
        }
        Role::Leader(Self::lead(self, &mut running, key, epoch, false))
    }

    fn lead(
        this: &Arc<Self>,
        running: &mut HashMap<Arc<str>, Slot<T>>,
        key: &Arc<str>,
        epoch: u64,
        refresh: bool,
    ) -> Lead<T> {
        let (tx, rx) = watch::channel(State {
            landed: None,
            leader_waits: false,
        });
        running.insert(key.clone(), Slot { rx, epoch, refresh });
        Lead {
            flights: this.clone(),
            key: key.clone(),
            tx: Some(tx),
        }
    }

    /// Waits on the rebuild of a missing entry that runs for `key`, if one
    /// started in `epoch` or later (not a background refresh).
    pub(crate) fn join_running(&self, key: &str, epoch: u64) -> Option<Wait<T>> {
        let running = self.lock();
        let slot = running.get(key)?;
        (slot.live() && !slot.refresh && slot.epoch >= epoch).then(|| Wait {
            rx: slot.rx.clone(),
        })
    }

    /// Leads a background refresh of `key`, only if no flight runs for it.
    pub(crate) fn try_lead_refresh(
        self: &Arc<Self>,
        key: &Arc<str>,
        epoch: u64,
    ) -> Option<Lead<T>> {
        let mut running = self.lock();
        match running.get(key) {
            Some(slot) if slot.live() => None,
            _ if running.len() >= self.capacity => None,
            _ => Some(Self::lead(self, &mut running, key, epoch, true)),
        }
    }

    /// Number of running flights.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The leader's side of a flight.
pub(crate) struct Lead<T> {
    flights: Arc<SingleFlight<T>>,
    key: Arc<str>,
    tx: Option<watch::Sender<State<T>>>,
}

impl<T> fmt::Debug for Lead<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lead").field("key", &self.key).finish()
    }
}

impl<T> Lead<T> {
    /// Tells the waiters that the leader starts a new phase (its own call
    /// to the inner service, after waiting for another process): their
    /// wait is timed afresh from now.
    pub(crate) fn restart_clock(&self) {
        if let Some(tx) = &self.tx {
            tx.send_modify(|state| state.leader_waits = false);
        }
    }

    /// Tells the waiters that the leader waits for something bounded on
    /// its own (another process's rebuild).
    pub(crate) fn awaiting_remote(&self) {
        if let Some(tx) = &self.tx {
            tx.send_modify(|state| state.leader_waits = true);
        }
    }

    /// Whether anyone waits on this flight.
    pub(crate) fn has_waiters(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.receiver_count() > 1)
    }

    /// Ends the flight: every waiter gets `value`.
    pub(crate) fn land(mut self, value: T) {
        self.finish(Some(value));
    }

    fn finish(&mut self, value: Option<T>) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        {
            let mut running = self.flights.lock();
            // Remove our slot only: a later flight may own the key by now.
            if running
                .get(&self.key)
                .is_some_and(|slot| slot.rx.same_channel(&tx.subscribe()))
            {
                running.remove(&self.key);
            }
        }
        // Sent after removal, so a waiter that retries finds no stale slot.
        if let Some(value) = value {
            tx.send_modify(|state| {
                state.landed = Some(value);
                state.leader_waits = false;
            });
        }
        // Dropping `tx` closes the channel: waiters without a value retry.
    }
}

impl<T> Drop for Lead<T> {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// A waiter's side of a flight.
pub(crate) struct Wait<T> {
    rx: watch::Receiver<State<T>>,
}

impl<T> fmt::Debug for Wait<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait").finish_non_exhaustive()
    }
}

/// How a wait ended.
#[derive(Debug)]
pub(crate) enum Waited<T> {
    /// The leader landed this.
    Landed(T),
    /// The leader went away without landing: join again.
    Retry,
    /// The wait ran out; the flight is handed back for [`SingleFlight::take_over`].
    TimedOut(Wait<T>),
}

impl<T: Clone> Wait<T> {
    /// The flight's value; `timeout` (timed from the leader's last phase
    /// change) bounds the wait, `None` waits for as long as the leader.
    pub(crate) async fn landing(mut self, timeout: Option<Duration>) -> Waited<T> {
        loop {
            let leader_waits = {
                let state = self.rx.borrow_and_update();
                if let Some(value) = &state.landed {
                    return Waited::Landed(value.clone());
                }
                state.leader_waits
            };
            let changed = match timeout {
                Some(limit) if !leader_waits => {
                    match tokio::time::timeout(limit, self.rx.changed()).await {
                        Ok(changed) => changed,
                        Err(_) => return Waited::TimedOut(self),
                    }
                }
                _ => self.rx.changed().await,
            };
            if changed.is_err() {
                // The sender is gone: its last value, or the leader vanished.
                return match self.rx.borrow().landed.clone() {
                    Some(value) => Waited::Landed(value),
                    None => Waited::Retry,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Option<Duration> = Some(Duration::from_secs(5));

    fn flights() -> Arc<SingleFlight<u32>> {
        Arc::new(SingleFlight::new(100))
    }

    fn key(k: &str) -> Arc<str> {
        Arc::from(k)
    }

    #[tokio::test]
    async fn one_leader_many_waiters_all_get_the_landing() {
        let flights = flights();
        let Role::Leader(lead) = flights.join(&key("k"), 0) else {
            panic!("first is the leader")
        };
        let waits: Vec<_> = (0..100)
            .map(|_| match flights.join(&key("k"), 0) {
                Role::Waiter(w) => tokio::spawn(w.landing(LONG)),
                _ => panic!("only one leader"),
            })
            .collect();
        lead.land(7);
        for w in waits {
            assert!(matches!(w.await.unwrap(), Waited::Landed(7)));
        }
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join(&key("k"), 0), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_makes_waiters_retry() {
        let flights = flights();
        let Role::Leader(lead) = flights.join(&key("k"), 0) else {
            panic!()
        };
        let Role::Waiter(wait) = flights.join(&key("k"), 0) else {
            panic!()
        };
        let waiting = tokio::spawn(wait.landing(LONG));
        drop(lead);
        assert!(matches!(waiting.await.unwrap(), Waited::Retry));
        assert!(flights.try_lead_refresh(&key("k"), 0).is_some());
    }

    #[tokio::test]
    async fn an_aborted_leader_task_frees_its_waiters() {
        let flights = flights();
        let Role::Leader(lead) = flights.join(&key("k"), 0) else {
            panic!()
        };
        let task = tokio::spawn(async move {
            let _lead = lead;
            std::future::pending::<()>().await;
        });
        let Role::Waiter(wait) = flights.join(&key("k"), 0) else {
            panic!()
        };
        task.abort();
        assert!(matches!(wait.landing(LONG).await, Waited::Retry));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_hands_over_one_relief_leader() {
        let flights = flights();
        let k = key("k");
        let Role::Leader(slow) = flights.join(&k, 0) else {
            panic!()
        };
        let mut waits = Vec::new();
        for _ in 0..10 {
            let Role::Waiter(w) = flights.join(&k, 0) else {
                panic!()
            };
            waits.push(w.landing(Some(Duration::from_millis(20))).await);
        }
        let mut leaders = Vec::new();
        let mut waiters = 0;
        for waited in waits {
            let Waited::TimedOut(wait) = waited else {
                panic!("the leader never lands")
            };
            match flights.take_over(&k, 0, &wait) {
                Role::Leader(lead) => leaders.push(lead),
                Role::Waiter(_) => waiters += 1,
                Role::Full => panic!(),
            }
        }
        assert_eq!(leaders.len(), 1, "one relief leader, not ten");
        assert_eq!(waiters, 9);
        drop(slow);
    }

    #[tokio::test]
    async fn a_newer_epoch_does_not_join_an_older_flight() {
        let flights = flights();
        let k = key("k");
        let Role::Leader(old) = flights.join(&k, 1) else {
            panic!()
        };
        assert!(flights.join_running(&k, 2).is_none());
        let Role::Leader(new) = flights.join(&k, 2) else {
            panic!("a request after a write leads a flight of its own")
        };
        // A request of the old epoch may join the newer flight.
        let Role::Waiter(wait) = flights.join(&k, 1) else {
            panic!()
        };
        old.land(1);
        new.land(2);
        assert!(matches!(wait.landing(LONG).await, Waited::Landed(2)));
    }

    #[tokio::test]
    async fn waiters_are_patient_while_the_leader_waits_for_another_process() {
        let flights = flights();
        let k = key("k");
        let lead = flights.try_lead_refresh(&k, 0).unwrap();
        lead.awaiting_remote();
        let Role::Waiter(wait) = flights.join(&k, 0) else {
            panic!()
        };
        let waiting = tokio::spawn(wait.landing(Some(Duration::from_millis(50))));
        tokio::time::sleep(Duration::from_millis(200)).await;
        lead.land(3);
        assert!(matches!(waiting.await.unwrap(), Waited::Landed(3)));
    }

    #[tokio::test]
    async fn only_rebuilds_of_missing_entries_are_joined_without_a_lookup() {
        let flights = flights();
        let _refresh = flights.try_lead_refresh(&key("fresh"), 0).unwrap();
        assert!(flights.join_running("fresh", 0).is_none());
        let Role::Leader(lead) = flights.join(&key("cold"), 0) else {
            panic!()
        };
        let wait = flights.join_running("cold", 0).unwrap();
        lead.land(4);
        assert!(matches!(wait.landing(LONG).await, Waited::Landed(4)));
        assert!(flights.join_running("cold", 0).is_none());
    }

    #[test]
    fn flights_are_bounded() {
        let flights: Arc<SingleFlight<u32>> = Arc::new(SingleFlight::new(2));
        let _a = flights.join(&key("a"), 0);
        let _b = flights.join(&key("b"), 0);
        assert!(matches!(flights.join(&key("c"), 0), Role::Full));
        assert!(flights.try_lead_refresh(&key("c"), 0).is_none());
    }
}
