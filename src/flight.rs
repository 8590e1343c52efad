//! In-process single flight: one rebuild per key, every other request for
//! that key awaits its result in memory.
//!
//! The leader holds a [`Lead`]; the others hold a [`Wait`] on the same
//! flight. The leader ends the flight by [`Lead::land`]ing what the waiters
//! get. A `Lead` dropped without landing (its task was aborted, or it
//! panicked) ends the flight too: the waiters see [`Landing::Retry`] and try
//! again — one of them becomes the next leader — instead of hanging (moka's
//! `WaiterGuard` works the same way).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::entry::Entry;
use crate::key::CacheKey;
use crate::service::Found;

/// What a flight ended with, as its waiters see it.
#[derive(Debug, Clone)]
pub(crate) enum Landing {
    /// A response every waiter may be given: a stored entry, or a shared
    /// error response that was not stored.
    Response(Arc<Entry>),
    /// The leader's response may not be shared (`private`, `Set-Cookie`,
    /// too large): each waiter goes to the origin itself.
    Uncacheable,
    /// The leader went away without an answer: join again.
    Retry,
}

/// What the waiters of a flight see.
#[derive(Debug, Clone, Default)]
struct FlightState {
    landing: Option<Landing>,
    /// The leader waits for another process's rebuild; that wait is bounded
    /// on its own, so the local waiters do not time out meanwhile.
    leader_waits: bool,
    /// A background refresh (the entry is still served meanwhile), not a
    /// rebuild of a missing entry.
    refresh: bool,
}

type Slot = watch::Receiver<FlightState>;

/// The flights of one layer.
#[derive(Default)]
pub(crate) struct Flights {
    running: Mutex<HashMap<String, Slot>>,
}

impl fmt::Debug for Flights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flights")
            .field("running", &self.lock().len())
            .finish()
    }
}

/// The role a request got for its key.
pub(crate) enum Joined {
    Leader(Lead),
    Waiter(Wait),
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // Nothing is left half-done under this lock: recover from poison.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leads the flight for `key`, or waits on the one that runs.
    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Joined {
        self.join_as(key, false)
    }

    /// Waits on the rebuild of a missing entry that runs for `key`, if one
    /// does: such a request would miss in the store too, so it need not ask.
    pub(crate) fn wait_for_rebuild(&self, key: &str) -> Option<Wait> {
        let running = self.lock();
        let slot = running.get(key)?;
        let live = slot.has_changed().is_ok() && !slot.borrow().refresh;
        live.then(|| Wait { rx: slot.clone() })
    }

    fn join_as(self: &Arc<Self>, key: &str, refresh: bool) -> Joined {
        let mut running = self.lock();
        if let Some(slot) = running.get(key) {
            // A slot whose leader is gone and that never landed is stale:
            // take it over.
            if slot.has_changed().is_ok() {
                return Joined::Waiter(Wait { rx: slot.clone() });
            }
        }
        let (tx, rx) = watch::channel(FlightState {
            refresh,
            ..FlightState::default()
        });
        running.insert(key.to_owned(), rx);
        Joined::Leader(Lead {
            flights: self.clone(),
            key: key.to_owned(),
            tx: Some(tx),
        })
    }

    /// Leads the flight for `key` only if none runs (background refreshes).
    pub(crate) fn try_lead(self: &Arc<Self>, key: &str) -> Option<Lead> {
        match self.join_as(key, true) {
            Joined::Leader(lead) => Some(lead),
            Joined::Waiter(_) => None,
        }
    }

    /// Number of running flights (for tests and debugging).
    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The leader's side of a flight.
pub(crate) struct Lead {
    flights: Arc<Flights>,
    key: String,
    tx: Option<watch::Sender<FlightState>>,
}

impl fmt::Debug for Lead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lead").field("key", &self.key).finish()
    }
}

impl Lead {
    /// Tells the waiters that the leader starts a new phase (its own call
    /// to the inner service, after waiting for another process): their
    /// wait is timed afresh from now.
    pub(crate) fn restart_clock(&self) {
        if let Some(tx) = &self.tx {
            tx.send_modify(|state| state.leader_waits = false);
        }
    }

    /// Tells the waiters that the leader waits for another process's
    /// rebuild (a wait bounded by itself).
    pub(crate) fn awaiting_remote(&self) {
        if let Some(tx) = &self.tx {
            tx.send_modify(|state| state.leader_waits = true);
        }
    }

    /// Ends the flight: every waiter gets `landing`.
    pub(crate) fn land(mut self, landing: Landing) {
        self.finish(Some(landing));
    }

    fn finish(&mut self, landing: Option<Landing>) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        {
            let mut running = self.flights.lock();
            // Remove our slot only: a later flight may own the key by now.
            if running
                .get(&self.key)
                .is_some_and(|slot| slot.same_channel(&tx.subscribe()))
            {
                running.remove(&self.key);
            }
        }
        // Sent after removal, so a waiter that retries finds no stale slot.
        tx.send_modify(|state| {
            state.landing = Some(landing.unwrap_or(Landing::Retry));
            state.leader_waits = false;
        });
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// A waiter's side of a flight.
pub(crate) struct Wait {
    rx: Slot,
}

impl fmt::Debug for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait").finish_non_exhaustive()
    }
}

impl Wait {
    /// The flight's landing, or `None` when `timeout` passed first, timed
    /// from the leader's last phase change.
    pub(crate) async fn landing(mut self, timeout: Duration) -> Option<Landing> {
        loop {
            let leader_waits = {
                let state = self.rx.borrow_and_update();
                if let Some(landing) = &state.landing {
                    return Some(landing.clone());
                }
                state.leader_waits
            };
            let changed = if leader_waits {
                Ok(self.rx.changed().await)
            } else {
                tokio::time::timeout(timeout, self.rx.changed()).await
            };
            match changed {
                Err(_) => return None,
                // The sender is gone: its last value, or the leader vanished.
                Ok(Err(_)) => {
                    return Some(self.rx.borrow().landing.clone().unwrap_or(Landing::Retry))
                }
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Store reads in flight: concurrent lookups of one key share one read.
///
/// A burst for a hot (or cold) key costs the store one `GET`, not one per
/// request; the others get a copy of what it found. If the request that
/// reads goes away mid-read, the others read for themselves.
#[derive(Default)]
pub(crate) struct Lookups {
    running: Mutex<HashMap<Arc<str>, watch::Receiver<Option<Found>>>>,
}

impl fmt::Debug for Lookups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lookups").finish_non_exhaustive()
    }
}

/// The role of a lookup.
pub(crate) enum Reading {
    /// Read the store, then [`ReadGuard::share`] the result.
    First(ReadGuard),
    /// Another request reads; await its result.
    Follow(watch::Receiver<Option<Found>>),
}

impl Lookups {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, watch::Receiver<Option<Found>>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn start(self: &Arc<Self>, key: &CacheKey) -> Reading {
        let mut running = self.lock();
        if let Some(rx) = running.get(key.as_str()) {
            if rx.has_changed().is_ok() {
                return Reading::Follow(rx.clone());
            }
        }
        let (tx, rx) = watch::channel(None);
        running.insert(key.shared(), rx);
        Reading::First(ReadGuard {
            lookups: self.clone(),
            key: key.shared(),
            tx: Some(tx),
        })
    }
}

/// The reading request's side: shares its result, or on drop frees the key.
pub(crate) struct ReadGuard {
    lookups: Arc<Lookups>,
    key: Arc<str>,
    tx: Option<watch::Sender<Option<Found>>>,
}

impl ReadGuard {
    pub(crate) fn share(mut self, found: &Found) {
        if let Some(tx) = self.tx.take() {
            self.forget(&tx);
            // No follower can join once the key is forgotten: copy the
            // result only for those that did (usually none, on a hit).
            if tx.receiver_count() > 0 {
                tx.send_replace(Some(found.share()));
            }
        }
    }

    fn forget(&self, tx: &watch::Sender<Option<Found>>) {
        let mut running = self.lookups.lock();
        if running
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&tx.subscribe()))
        {
            running.remove(&self.key);
        }
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.forget(&tx);
        }
    }
}

/// Awaits another request's read; `None` if it went away without one.
pub(crate) async fn follow(mut rx: watch::Receiver<Option<Found>>) -> Option<Found> {
    match rx.wait_for(Option::is_some).await {
        Ok(found) => found.as_ref().map(Found::share),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn entry() -> Arc<Entry> {
        Arc::new(Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"x"),
            trailers: None,
            stored_at_ms: 0,
            fresh_until_ms: 1,
            stale_until_ms: 1,
            error_until_ms: 1,
            rebuild_ms: 0,
            flags: 0,
            vary: Vec::new(),
        })
    }

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn one_leader_many_waiters_all_get_the_landing() {
        let flights = Arc::new(Flights::default());
        let Joined::Leader(lead) = flights.join("k") else {
            panic!("first is the leader")
        };
        let waits: Vec<_> = (0..100)
            .map(|_| match flights.join("k") {
                Joined::Waiter(w) => tokio::spawn(w.landing(LONG)),
                Joined::Leader(_) => panic!("only one leader"),
            })
            .collect();
        lead.land(Landing::Response(entry()));
        for w in waits {
            assert!(matches!(w.await.unwrap(), Some(Landing::Response(..))));
        }
        assert_eq!(flights.len(), 0);
        // The next request leads a new flight.
        assert!(matches!(flights.join("k"), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_makes_waiters_retry() {
        let flights = Arc::new(Flights::default());
        let Joined::Leader(lead) = flights.join("k") else {
            panic!()
        };
        let Joined::Waiter(wait) = flights.join("k") else {
            panic!()
        };
        let waiting = tokio::spawn(wait.landing(LONG));
        drop(lead);
        assert!(matches!(waiting.await.unwrap(), Some(Landing::Retry)));
        assert!(flights.try_lead("k").is_some());
    }

    #[tokio::test]
    async fn an_aborted_leader_task_frees_its_waiters() {
        let flights = Arc::new(Flights::default());
        let Joined::Leader(lead) = flights.join("k") else {
            panic!()
        };
        let task = tokio::spawn(async move {
            let _lead = lead;
            std::future::pending::<()>().await;
        });
        let Joined::Waiter(wait) = flights.join("k") else {
            panic!()
        };
        task.abort();
        assert!(matches!(wait.landing(LONG).await, Some(Landing::Retry)));
    }

    #[tokio::test]
    async fn waiting_is_bounded() {
        let flights = Arc::new(Flights::default());
        let _lead = flights.try_lead("k").unwrap();
        let Joined::Waiter(wait) = flights.join("k") else {
            panic!()
        };
        assert!(wait.landing(Duration::from_millis(20)).await.is_none());
        assert!(flights.try_lead("k").is_none());
    }

    #[tokio::test]
    async fn a_new_phase_restarts_the_waiters_clock() {
        let flights = Arc::new(Flights::default());
        let lead = flights.try_lead("k").unwrap();
        let Joined::Waiter(wait) = flights.join("k") else {
            panic!()
        };
        let waiting = tokio::spawn(wait.landing(Duration::from_millis(150)));
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            lead.restart_clock();
        }
        lead.land(Landing::Uncacheable);
        assert!(matches!(waiting.await.unwrap(), Some(Landing::Uncacheable)));
    }

    #[tokio::test]
    async fn waiters_are_patient_while_the_leader_waits_for_another_process() {
        let flights = Arc::new(Flights::default());
        let lead = flights.try_lead("k").unwrap();
        lead.awaiting_remote();
        let Joined::Waiter(wait) = flights.join("k") else {
            panic!()
        };
        let waiting = tokio::spawn(wait.landing(Duration::from_millis(50)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        lead.land(Landing::Uncacheable);
        assert!(matches!(waiting.await.unwrap(), Some(Landing::Uncacheable)));
    }

    #[tokio::test]
    async fn only_rebuilds_of_missing_entries_are_joined_without_a_lookup() {
        let flights = Arc::new(Flights::default());
        let refresh = flights.try_lead("fresh").unwrap();
        assert!(flights.wait_for_rebuild("fresh").is_none());
        let Joined::Leader(lead) = flights.join("cold") else {
            panic!()
        };
        let wait = flights.wait_for_rebuild("cold").unwrap();
        lead.land(Landing::Uncacheable);
        assert!(matches!(
            wait.landing(LONG).await,
            Some(Landing::Uncacheable)
        ));
        assert!(flights.wait_for_rebuild("cold").is_none());
        drop(refresh);
    }

    #[tokio::test]
    async fn keys_fly_independently() {
        let flights = Arc::new(Flights::default());
        let _a = flights.try_lead("a").unwrap();
        assert!(flights.try_lead("b").is_some());
    }
}
