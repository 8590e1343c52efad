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
//! A waiter's wait is bounded. When it runs out, the first waiter of the
//! flight to notice becomes one more leader of the *same* flight (a relief
//! leader) and the others wait again: whichever leader lands first answers
//! every waiter. An origin slower than the wait so costs one call per
//! wait, not one per waiter.
//!
//! A leader that reads what it will land from the store, or stores what it
//! rebuilt, first *seals* the flight for that operation: a request that
//! joins after the operation started may not get its result (a write of
//! another process may have finished in between, unseen here), and looks
//! again instead. A request that joined before gets it: whatever the
//! operation read or stored came after the request arrived.
//!
//! Each flight remembers the *epoch* it started in. A request may join only
//! a flight that started in its own epoch or later: when a write of this
//! process finishes, the layer moves the epoch on, and requests that arrive
//! after it start a new flight instead of joining one that may have read
//! data from before the write.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;

/// What the waiters of a flight see.
#[derive(Debug, Clone)]
struct State<T> {
    landed: Option<T>,
    /// The leader waits for something bounded on its own (another
    /// process's rebuild): the waiters do not time out meanwhile.
    leader_waits: bool,
    /// How many leaders the flight has had: one, plus one per wait that
    /// ran out and was relieved.
    leaders: u32,
    /// Store operations (reads, fills) the leaders started: see
    /// [`Lead::seal`].
    sealed: u64,
    /// The operation whose result `landed` is; 0 when it is no data read
    /// or stored (an error, an uncacheable answer).
    landed_by: u64,
}

type Sender<T> = Arc<watch::Sender<State<T>>>;

struct Slot<T> {
    rx: watch::Receiver<State<T>>,
    /// The leaders' side, for a relief leader to share.
    tx: Weak<watch::Sender<State<T>>>,
    epoch: u64,
    /// A background refresh (the entry is still served meanwhile).
    refresh: bool,
}

impl<T> Slot<T> {
    /// Some leader is still there (or one landed and the slot is on its
    /// way out).
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

    /// Number of running flights.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl<T: Clone> SingleFlight<T> {
    /// Leads the flight for `key`, or waits on the one that runs, if it
    /// started in `epoch` or later.
    pub(crate) fn join(self: &Arc<Self>, key: &Arc<str>, epoch: u64) -> Role<T> {
        let mut running = self.lock();
        if let Some(slot) = running.get(key) {
            if slot.live() && slot.epoch >= epoch {
                return Role::Waiter(Wait::on(&slot.rx));
            }
        } else if running.len() >= self.capacity {
            return Role::Full;
        }
        Role::Leader(self.lead(&mut running, key, epoch, false))
    }

    /// After `gave_up`'s wait ran out: the first of the flight's waiters
    /// to get here becomes one more leader of the same flight (a relief
    /// leader: whichever leader lands first answers every waiter); the
    /// others wait again. A flight that ended meanwhile is joined afresh.
    pub(crate) fn take_over(
        self: &Arc<Self>,
        key: &Arc<str>,
        epoch: u64,
        gave_up: &Wait<T>,
    ) -> Role<T> {
        let running = self.lock();
        if let Some(slot) = running.get(key) {
            if slot.rx.same_channel(&gave_up.rx) {
                let relieved = slot.rx.borrow().leaders != gave_up.leaders;
                return match slot.tx.upgrade() {
                    // Another waiter took it over already: wait for them.
                    Some(_) if relieved => Role::Waiter(Wait::on(&slot.rx)),
                    Some(tx) => {
                        tx.send_modify(|state| {
                            state.leaders += 1;
                            state.leader_waits = false;
                        });
                        Role::Leader(Lead {
                            flights: self.clone(),
                            key: key.clone(),
                            tx: Some(tx),
                        })
                    }
                    None => {
                        drop(running);
                        self.join(key, epoch)
                    }
                };
            }
        }
        drop(running);
        self.join(key, epoch)
    }

    fn lead(
        self: &Arc<Self>,
        running: &mut HashMap<Arc<str>, Slot<T>>,
        key: &Arc<str>,
        epoch: u64,
        refresh: bool,
    ) -> Lead<T> {
        let (tx, rx) = watch::channel(State {
            landed: None,
            leader_waits: false,
            leaders: 1,
            sealed: 0,
            landed_by: 0,
        });
        let tx = Arc::new(tx);
        running.insert(
            key.clone(),
            Slot {
                rx,
                tx: Arc::downgrade(&tx),
                epoch,
                refresh,
            },
        );
        Lead {
            flights: self.clone(),
            key: key.clone(),
            tx: Some(tx),
        }
    }

    /// Waits on the rebuild of a missing entry that runs for `key`, if one
    /// started in `epoch` or later (not a background refresh).
    pub(crate) fn join_running(&self, key: &str, epoch: u64) -> Option<Wait<T>> {
        let running = self.lock();
        let slot = running.get(key)?;
        (slot.live() && !slot.refresh && slot.epoch >= epoch).then(|| Wait::on(&slot.rx))
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
            _ => Some(self.lead(&mut running, key, epoch, true)),
        }
    }
}

/// A leader's side of a flight (a flight may have several: see
/// [`SingleFlight::take_over`]).
pub(crate) struct Lead<T> {
    flights: Arc<SingleFlight<T>>,
    key: Arc<str>,
    tx: Option<Sender<T>>,
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

    /// Seals the flight for a store operation (a read or a fill) whose
    /// result it may land: requests that join from now on do not get that
    /// result. Returns the operation, for [`land_by`](Self::land_by).
    pub(crate) fn seal(&self) -> u64 {
        let mut op = 0;
        if let Some(tx) = &self.tx {
            tx.send_if_modified(|state| {
                state.sealed += 1;
                op = state.sealed;
                false
            });
        }
        op
    }

    /// Ends the flight with the result of operation `op` (see
    /// [`seal`](Self::seal)): the waiters that joined before it started get
    /// `value`, the others look again.
    pub(crate) fn land_by(self, value: T, op: u64) {
        self.settle(value, op);
    }

    /// Ends the flight: every waiter gets `value` (unless another leader
    /// of the flight landed first).
    pub(crate) fn land(self, value: T) {
        self.settle(value, 0);
    }

    fn settle(mut self, value: T, op: u64) {
        if let Some(tx) = self.tx.take() {
            self.forget(&tx);
            // Sent after removal, so a waiter that retries finds no stale
            // slot.
            tx.send_if_modified(|state| {
                if state.landed.is_some() {
                    return false;
                }
                state.landed = Some(value);
                state.landed_by = op;
                state.leader_waits = false;
                true
            });
        }
    }

    /// Removes the flight's slot, if it is still this flight's.
    fn forget(&self, tx: &Sender<T>) {
        let mut running = self.flights.lock();
        if running
            .get(&self.key)
            .is_some_and(|slot| slot.rx.same_channel(&tx.subscribe()))
        {
            running.remove(&self.key);
        }
    }
}

impl<T> Drop for Lead<T> {
    fn drop(&mut self) {
        // The last leader gone without landing ends the flight: dropping
        // the sender closes the channel, and the waiters retry.
        if let Some(tx) = self.tx.take() {
            if Arc::strong_count(&tx) == 1 {
                self.forget(&tx);
            }
        }
    }
}

/// A waiter's side of a flight.
pub(crate) struct Wait<T> {
    rx: watch::Receiver<State<T>>,
    /// How many leaders the flight had when this wait last looked.
    leaders: u32,
    /// Store operations the flight had started when this request joined.
    joined_after: u64,
}

impl<T> fmt::Debug for Wait<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait").finish_non_exhaustive()
    }
}

/// How a wait ended.
#[derive(Debug)]
pub(crate) enum Waited<T> {
    /// A leader landed this.
    Landed(T),
    /// The leaders went away without landing: join again.
    Retry,
    /// The wait ran out; the flight is handed back for [`SingleFlight::take_over`].
    TimedOut(Wait<T>),
}

impl<T: Clone> Wait<T> {
    fn on(rx: &watch::Receiver<State<T>>) -> Self {
        let state = rx.borrow();
        Wait {
            rx: rx.clone(),
            leaders: state.leaders,
            joined_after: state.sealed,
        }
    }

    /// The flight's value; `timeout` (timed from the leaders' last phase
    /// change) bounds the wait, `None` waits for as long as the leaders.
    pub(crate) async fn landing(mut self, timeout: Option<Duration>) -> Waited<T> {
        loop {
            let leader_waits = {
                let state = self.rx.borrow_and_update();
                if let Some(value) = &state.landed {
                    if state.landed_by != 0 && state.landed_by <= self.joined_after {
                        // Read or stored before this request joined: not
                        // for it.
                        return Waited::Retry;
                    }
                    return Waited::Landed(value.clone());
                }
                self.leaders = state.leaders;
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
                // The senders are gone: their last value, or they vanished.
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
    async fn the_first_leader_to_land_answers_every_waiter() {
        let flights = flights();
        let k = key("k");
        let Role::Leader(first) = flights.join(&k, 0) else {
            panic!()
        };
        let Role::Waiter(wait) = flights.join(&k, 0) else {
            panic!()
        };
        let Waited::TimedOut(gave_up) = wait.landing(Some(Duration::from_millis(1))).await else {
            panic!("nobody landed")
        };
        let Role::Leader(relief) = flights.take_over(&k, 0, &gave_up) else {
            panic!("the first to give up relieves")
        };
        let Role::Waiter(again) = flights.take_over(&k, 0, &gave_up) else {
            panic!("the flight was relieved already")
        };
        let waiting = tokio::spawn(again.landing(LONG));
        // The slow first leader lands after all: its value answers.
        first.land(1);
        relief.land(2);
        assert!(matches!(waiting.await.unwrap(), Waited::Landed(1)));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn waiters_retry_only_when_every_leader_is_gone() {
        let flights = flights();
        let k = key("k");
        let Role::Leader(first) = flights.join(&k, 0) else {
            panic!()
        };
        let Role::Waiter(wait) = flights.join(&k, 0) else {
            panic!()
        };
        let Waited::TimedOut(gave_up) = wait.landing(Some(Duration::from_millis(1))).await else {
            panic!()
        };
        let Role::Leader(relief) = flights.take_over(&k, 0, &gave_up) else {
            panic!()
        };
        let Role::Waiter(again) = flights.join(&k, 0) else {
            panic!()
        };
        let waiting = tokio::spawn(again.landing(LONG));
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(relief);
        assert!(matches!(waiting.await.unwrap(), Waited::Retry));
        assert!(matches!(flights.join(&k, 0), Role::Leader(_)));
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

    #[tokio::test]
    async fn a_request_that_joins_after_a_store_operation_started_looks_again() {
        let flights = Arc::new(SingleFlight::<u32>::new(10));
        let Role::Leader(lead) = flights.join(&key("k"), 0) else {
            panic!("first is the leader")
        };
        let Role::Waiter(before) = flights.join(&key("k"), 0) else {
            panic!("second waits")
        };
        let op = lead.seal();
        let Role::Waiter(after) = flights.join(&key("k"), 0) else {
            panic!("third waits")
        };
        lead.land_by(7, op);
        assert!(matches!(before.landing(LONG).await, Waited::Landed(7)));
        assert!(matches!(after.landing(LONG).await, Waited::Retry));
    }

    #[tokio::test]
    async fn an_unsealed_landing_is_for_every_waiter() {
        let flights = Arc::new(SingleFlight::<u32>::new(10));
        let Role::Leader(lead) = flights.join(&key("k"), 0) else {
            panic!("first is the leader")
        };
        let _ = lead.seal();
        let Role::Waiter(after) = flights.join(&key("k"), 0) else {
            panic!("second waits")
        };
        lead.land(3);
        assert!(matches!(after.landing(LONG).await, Waited::Landed(3)));
    }
}
