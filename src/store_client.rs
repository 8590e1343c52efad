//! Every store call of the layer goes through [`StoreClient`]: it asks the
//! circuit breaker, bounds the call by the store timeout, counts failures
//! and decodes records. This is the one place where a sick store is
//! noticed, and where the invalidations it still owes keep old entries from
//! being served.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
#[cfg(feature = "metrics")]
use std::time::Instant;
use tracing::Instrument;

use http::HeaderName;

use crate::breaker::{Admission, Breaker, Turn};
use crate::entry::{Entry, Record};
use crate::error::StoreError;
use crate::metrics;
use crate::owed::Owed;
use crate::store::{Fill, FillSubscription, HeldRecord, KeyPattern, Store};

/// A kind of store call: its metric label and what a log line says.
#[derive(Debug, Clone, Copy)]
struct Op {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    name: &'static str,
    doing: &'static str,
}

impl Op {
    const fn new(name: &'static str, doing: &'static str) -> Self {
        Op { name, doing }
    }
}

const GET: Op = Op::new("get", "a lookup");
const PROBE: Op = Op::new("probe", "a probe");
const TRY_LEASE: Op = Op::new("try_lease", "taking a lease");
const EXTEND_LEASE: Op = Op::new("extend_lease", "extending a lease");
const RELEASE_LEASE: Op = Op::new("release_lease", "releasing a lease");
const FILL: Op = Op::new("fill", "storing a response");
const DELETE: Op = Op::new("delete", "deleting a key");
const PURGE_MATCHING: Op = Op::new("purge_matching", "purging by pattern");
const PURGE_MEMBERS: Op = Op::new("purge_members", "purging a set's members");
const PURGE_KEY: Op = Op::new("purge_key", "purging a key");

/// When a store call started: read only for the metrics, so without them
/// no clock is read.
struct Timer(#[cfg(feature = "metrics")] Instant);

impl Timer {
    fn start() -> Self {
        Timer(
            #[cfg(feature = "metrics")]
            Instant::now(),
        )
    }
}

/// The key a probe reads (nothing is stored under it).
const PROBE_KEY: &str = "tower-fence:probe";

/// What a read of one key found.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Found {
    Entry(Entry),
    /// A vary stub: the variant is under a key of its own.
    Vary(Vec<HeaderName>),
    Nothing,
    Failed(StoreError),
}

impl Found {
    /// A copy for a request that shared this read.
    pub(crate) fn share(&self) -> Found {
        match self {
            Found::Entry(entry) => Found::Entry(entry.clone()),
            Found::Vary(names) => Found::Vary(names.clone()),
            Found::Nothing => Found::Nothing,
            Found::Failed(err) => Found::Failed(err.copy_kind()),
        }
    }
}

/// The layer's handle on its store.
pub(crate) struct StoreClient {
    store: Arc<dyn Store>,
    timeout: Option<Duration>,
    breaker: Breaker,
    /// Invalidations not applied yet: entries older than them are not
    /// served.
    owed: Owed,
    errors: AtomicU64,
    decode_errors: AtomicU64,
    distrusted: AtomicU64,
}

impl fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreClient")
            .field("store", &self.store)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl StoreClient {
    pub(crate) fn new(store: Arc<dyn Store>, timeout: Option<Duration>, breaker: Breaker) -> Self {
        StoreClient {
            store,
            timeout,
            breaker,
            owed: Owed::new(crate::owed::OWED_CAPACITY),
            errors: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            distrusted: AtomicU64::new(0),
        }
    }

    /// The circuit breaker of this store.
    pub(crate) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The invalidations this store still owes.
    pub(crate) fn owed(&self) -> &Owed {
        &self.owed
    }

    /// Entries found but not served because an invalidation newer than
    /// them was not applied yet.
    pub(crate) fn distrusted(&self) -> u64 {
        self.distrusted.load(Ordering::Relaxed)
    }

    /// The store itself.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Store calls that failed or timed out so far.
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Records that did not decode so far.
    pub(crate) fn decode_errors(&self) -> u64 {
        self.decode_errors.load(Ordering::Relaxed)
    }

    /// Runs `call` under the store timeout; a failure is counted and
    /// logged with `doing` and `key`.
    async fn bounded<T>(
        &self,
        op: Op,
        key: &str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.guarded(op, key, self.timeout, call).await
    }

    /// Runs `call` if the breaker lets it, under `timeout`; tells the
    /// breaker how it went. A skipped call fails at once with
    /// [`StoreError::skipped`], without a log line of its own.
    async fn guarded<T>(
        &self,
        op: Op,
        key: &str,
        timeout: Option<Duration>,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let admission = self.breaker.admit();
        if admission == Admission::Skip {
            metrics::count(metrics::STORE_SKIPPED);
            return Err(StoreError::skipped());
        }
        let result = self.attempt(op, admission, timeout, call).await;
        self.count_failure(op, key, &result);
        result
    }

    /// Counts and logs a failed call.
    fn count_failure<T>(&self, op: Op, key: &str, result: &Result<T, StoreError>) {
        if let Err(err) = result {
            self.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key, error = %err, "tower-fence: {} failed", op.doing);
        }
    }

    /// Runs an admitted `call` under `timeout` and tells the breaker how
    /// it went. A probe whose call is dropped before it ends lets the next
    /// call probe.
    async fn attempt<T>(
        &self,
        op: Op,
        admission: Admission,
        timeout: Option<Duration>,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let mut probe = ProbeGuard {
            breaker: &self.breaker,
            admission,
        };
        let timer = Timer::start();
        let result = match timeout {
            None => call.await,
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .unwrap_or_else(|_| Err(StoreError::timeout())),
        };
        probe.admission = Admission::Call;
        self.record(op, admission, timer, &result);
        result
    }

    /// Tells the metrics and the breaker how an admitted call went.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn record<T>(
        &self,
        op: Op,
        admission: Admission,
        timer: Timer,
        result: &Result<T, StoreError>,
    ) {
        #[cfg(feature = "metrics")]
        {
            let outcome = match result {
                Ok(_) => "ok",
                Err(err) => err.metric_label(),
            };
            metrics::store_call(op.name, timer.0.elapsed(), outcome);
        }
        let healthy = result.as_ref().map_or_else(|err| !err.is_sick(), |_| true);
        match self.breaker.record(admission, healthy) {
            Turn::Opened => {
                metrics::breaker(true);
                self.store.reconnect();
                tracing::warn!(
                    cool_down = ?self.breaker.cool_down(),
                    "tower-fence: the store keeps failing; skipping it (circuit breaker open)"
                );
            }
            Turn::Closed => {
                metrics::breaker(false);
                tracing::info!("tower-fence: the store answers again (circuit breaker closed)");
            }
            Turn::Stayed => {}
        }
    }

    /// Probes an open breaker's store now, cool-down or not, with one
    /// cheap read under the store timeout: `true` when the breaker is
    /// closed (already, or by this probe). `false` without a call when
    /// another probe is out.
    pub(crate) async fn probe(&self) -> bool {
        if !self.breaker.is_open() {
            return true;
        }
        if !self.breaker.claim_probe() {
            return false;
        }
        let limit = self.timeout.unwrap_or(Duration::from_secs(1));
        let call = self.store.get(PROBE_KEY);
        let result = self
            .attempt(PROBE, Admission::Probe, Some(limit), call)
            .await;
        result.map_or_else(|err| !err.is_sick(), |_| true)
    }

    /// Reads and decodes the record under `key`. A record that does not
    /// decode is a miss (and is deleted in the background).
    pub(crate) async fn read(self: &Arc<Self>, key: &str) -> Found {
        let result = self.bounded(GET, key, self.store.get(key)).await;
        self.found(key, result.map(|record| record.map(HeldRecord::new)))
    }

    /// [`read`](Self::read) at once, when the store can answer without
    /// waiting (see [`Store::get_held_now`]) and its breaker is closed; else
    /// `None`, and the caller reads.
    pub(crate) fn read_now(self: &Arc<Self>, key: &str) -> Option<Found> {
        if self.breaker.is_open() {
            return None;
        }
        let timer = Timer::start();
        let result = self.store.get_held_now(key)?;
        self.record(GET, Admission::Call, timer, &result);
        self.count_failure(GET, key, &result);
        Some(self.found(key, result))
    }

    /// What a read of `key` that gave `result` found.
    fn found(self: &Arc<Self>, key: &str, result: Result<Option<HeldRecord>, StoreError>) -> Found {
        let record = match result {
            Ok(Some(record)) => record,
            Ok(None) => return Found::Nothing,
            Err(err) => return Found::Failed(err),
        };
        // Decoded when it was stored (a store in this process), else now.
        let decoded = match record.decoded() {
            Some(decoded) => Ok(decoded.copy_to_serve()),
            None => Record::decode(record.bytes(), key),
        };
        match decoded {
            Ok(Record::Entry(entry)) if !self.owed.trusts(entry.generated_ms()) => {
                // Maybe older than a write whose invalidation is not
                // applied yet: rebuilt, not served.
                self.distrusted.fetch_add(1, Ordering::Relaxed);
                metrics::count(metrics::DISTRUSTED);
                tracing::debug!(
                    key,
                    "tower-fence: entry older than an unapplied invalidation; treated as a miss"
                );
                Found::Nothing
            }
            Ok(Record::Entry(entry)) => Found::Entry(entry),
            Ok(Record::Vary(names)) => Found::Vary(names),
            // Written by a newer instance (a rolling deploy): a miss here,
            // but still good for the instances that wrote it.
            Err(err) if err.is_unknown_version() => {
                tracing::debug!(key, error = %err, "tower-fence: keeping a record of a newer codec; treated as a miss");
                Found::Nothing
            }
            // Corrupt, retired or written for another key: never served.
            Err(err) => {
                self.decode_errors.fetch_add(1, Ordering::Relaxed);
                metrics::count(metrics::DECODE_ERRORS);
                tracing::warn!(key, error = %err, "tower-fence: deleting a record that does not decode");
                self.spawn_delete(key.to_owned());
                Found::Nothing
            }
        }
    }

    fn spawn_delete(self: &Arc<Self>, key: String) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.clone();
            let delete = async move {
                let _ = client.delete(&key).await;
            };
            handle.spawn(delete.instrument(tracing::Span::current()));
        }
    }

    /// Takes the lease of `key` for `ttl` unless someone holds it.
    pub(crate) async fn try_lease(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
        sets: &[String],
    ) -> Result<bool, StoreError> {
        let call = self.store.try_lease(key, token, ttl, sets);
        self.bounded(TRY_LEASE, key, call).await
    }

    /// Extends the lease of `key` if `token` holds it.
    pub(crate) async fn extend_lease(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let call = self.store.extend_lease(key, token, ttl);
        self.bounded(EXTEND_LEASE, key, call).await
    }

    /// Releases the lease of `key` if `token` holds it.
    pub(crate) async fn release_lease(&self, key: &str, token: &str) {
        let call = self.store.release_lease(key, token);
        let _ = self.bounded(RELEASE_LEASE, key, call).await;
    }

    /// Stores a record (see [`Store::fill`]): `Ok(false)` when its lease
    /// was lost.
    pub(crate) async fn fill(&self, fill: Fill<'_>) -> Result<bool, StoreError> {
        let key = fill.key;
        let call = self.store.fill(fill.clone());
        self.bounded(FILL, key, call).await
    }

    /// Deletes `key` (and its lease).
    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.bounded(DELETE, key, self.store.delete(key)).await
    }

    /// A subscription to fills of `key` by other processes.
    pub(crate) fn subscribe_fill(&self, key: &str) -> Option<FillSubscription> {
        self.store.subscribe_fill(key)
    }

    /// Removes what `pattern` selects, within `limit` (invalidations have
    /// their own bound, not the store timeout): deleted, or with
    /// `stale_at` (a soft purge) its leases deleted and its entries marked
    /// stale from then on.
    pub(crate) async fn delete_matching(
        &self,
        pattern: &KeyPattern,
        stale_at: Option<u64>,
        limit: Duration,
    ) -> Result<u64, StoreError> {
        let call = match stale_at {
            None => self.store.delete_matching(pattern),
            Some(at_ms) => self.store.mark_stale_matching(pattern, at_ms),
        };
        self.guarded(PURGE_MATCHING, &pattern.glob(), Some(limit), call)
            .await
    }

    /// Removes the members of `set` (as [`delete_matching`](Self::delete_matching)
    /// removes), within `limit`.
    pub(crate) async fn delete_members(
        &self,
        set: &str,
        stale_at: Option<u64>,
        limit: Duration,
    ) -> Result<u64, StoreError> {
        let call = match stale_at {
            None => self.store.delete_members(set),
            Some(at_ms) => self.store.mark_stale_members(set, at_ms),
        };
        self.guarded(PURGE_MEMBERS, set, Some(limit), call).await
    }

    /// Removes the members of `set` that `pattern` selects, within `limit`.
    pub(crate) async fn delete_members_matching(
        &self,
        set: &str,
        pattern: &KeyPattern,
        stale_at: Option<u64>,
        limit: Duration,
    ) -> Result<u64, StoreError> {
        let call = match stale_at {
            None => self.store.delete_members_matching(set, pattern),
            Some(at_ms) => self.store.mark_stale_members_matching(set, pattern, at_ms),
        };
        self.guarded(PURGE_MEMBERS, set, Some(limit), call).await
    }

    /// Removes `key` and its lease within `limit`: deleted, or (with
    /// `stale_at`) the lease deleted and the entry marked stale.
    pub(crate) async fn purge_key(
        &self,
        key: &str,
        stale_at: Option<u64>,
        limit: Duration,
    ) -> Result<u64, StoreError> {
        let call = match stale_at {
            None => Box::pin(async move {
                self.store.delete(key).await?;
                Ok(1)
            }),
            Some(at_ms) => self.store.mark_stale(key, at_ms),
        };
        self.guarded(PURGE_KEY, key, Some(limit), call).await
    }
}

/// Gives a probe back to the breaker when its call is dropped mid-way.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    admission: Admission,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.breaker.abandon(self.admission);
    }
}
