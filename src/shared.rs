//! The runtime state every service of one layer shares: settings, the
//! store client, the in-process flights, counters and the clock.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::entry::Entry;
use crate::invalidate::config::InvalidationConfig;
use crate::key::KeyConfig;
use crate::metrics::Counter;
use crate::policy::rules::Rules;
use crate::policy::{ClientCacheControl, PolicyConfig};
use crate::singleflight::SingleFlight;
use crate::store_client::StoreClient;

/// What a rebuild flight ends with, as its waiters see it.
#[derive(Debug, Clone)]
pub(crate) enum Landing {
    /// A response every waiter may be given: a stored entry, or a shared
    /// error response that was not stored.
    Response(Arc<Entry>),
    /// The leader's response may not be shared (`private`, `Set-Cookie`,
    /// too large, streaming): each waiter goes to the origin itself.
    Uncacheable,
    /// The inner service returned an error: the waiters of this flight get
    /// a `502` rather than calling it again each (no stampede on a failing
    /// origin); later requests start a new flight.
    Failed,
}

/// What every service made by one layer shares.
pub(crate) struct Shared {
    pub(crate) store: Arc<StoreClient>,
    pub(crate) key: KeyConfig,
    pub(crate) policy: PolicyConfig,
    pub(crate) max_body_size: usize,
    /// Largest gRPC request body read for a key.
    pub(crate) grpc_max_request: usize,
    /// Longest wait for a gRPC request body to end.
    pub(crate) grpc_read_timeout: Duration,
    pub(crate) wait_timeout: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) rebuild_timeout: Duration,
    pub(crate) fill_poll_interval: Duration,
    pub(crate) xfetch_beta: f64,
    pub(crate) keep: Duration,
    /// Rebuilds running in this process, one per key.
    pub(crate) flights: Arc<SingleFlight<Landing>>,
    /// Store reads running in this process, one per key (when shared).
    pub(crate) lookups: Arc<SingleFlight<Arc<crate::store_client::Found>>>,
    /// Whether concurrent requests for one key share one store read.
    pub(crate) share_lookups: bool,
    /// Keys whose last rebuild could not be shared: requests for them skip
    /// the flight for a while (Varnish's hit-for-miss).
    pub(crate) hit_for_miss: moka::sync::Cache<String, ()>,
    pub(crate) invalidation: InvalidationConfig,
    pub(crate) client_cache_control: ClientCacheControl,
    pub(crate) rules: Rules,
    pub(crate) counters: Counters,
    pub(crate) clock: Clock,
    /// Bumped when a write of this process has finished invalidating: a
    /// flight or a lookup that started before may not be joined after it.
    pub(crate) write_epoch: AtomicU64,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("store", &self.store)
            .field("namespace", &self.key.namespace)
            .field("default_ttl", &self.policy.default_ttl)
            .field("max_body_size", &self.max_body_size)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The keep window in milliseconds.
    pub(crate) fn keep_ms(&self) -> u64 {
        u64::try_from(self.keep.as_millis()).unwrap_or(u64::MAX)
    }

    /// The write epoch now: what a request that arrives now may join.
    pub(crate) fn epoch(&self) -> u64 {
        self.write_epoch.load(Ordering::Acquire)
    }

    /// A write finished invalidating: flights and lookups that started
    /// before it are no longer joined.
    pub(crate) fn write_done(&self) {
        self.write_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Bumps one counter.
    pub(crate) fn bump(&self, counter: fn(&Counters) -> &Counter) {
        counter(&self.counters).bump();
    }

    /// What the layer's services have done so far.
    pub(crate) fn stats(&self) -> Stats {
        let mut stats = self.counters.snapshot();
        stats.store_errors = self.store.errors();
        stats.decode_errors = self.store.decode_errors();
        stats.breaker_opened = self.store.breaker().opened();
        stats.store_skipped = self.store.breaker().skipped();
        stats.breaker_open = self.store.breaker().is_open();
        stats.invalidations_owed = self.store.owed().len() as u64;
        stats.distrusted = self.store.distrusted();
        stats
    }
}

/// Where the layer reads the time of day from.
///
/// Entries carry wall-clock times (they are shared between processes), so
/// the default is the system clock. Two clocks are for tests, so that TTL,
/// grace and `Age` need no sleeping:
///
/// - [`Clock::tokio`] follows Tokio's clock, from the wall-clock time at
///   which it was made: under `tokio::time::pause()` a test moves it with
///   `tokio::time::advance`.
/// - [`Clock::manual`] stands still until [`Clock::advance`] moves it. It
///   suits tests that talk over real sockets, where paused Tokio time
///   would fire IO timeouts while a read is pending.
///
/// Only the cache's notion of "now" follows the clock: how old an entry is,
/// whether it is fresh, in grace or usable on error. Timeouts, leases and
/// the stores' own expiry run on real time.
///
/// ```
/// use tower_fence::{Clock, FenceLayer};
///
/// let layer = FenceLayer::builder().clock(Clock::tokio()).build().unwrap();
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clock {
    source: Source,
}

#[derive(Debug, Clone, Default)]
enum Source {
    #[default]
    System,
    Tokio {
        base_ms: u64,
        base: tokio::time::Instant,
    },
    /// Milliseconds since the Unix epoch, shared by every clone.
    Manual(Arc<AtomicU64>),
}

impl PartialEq for Source {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Source::System, Source::System) => true,
            (
                Source::Tokio { base_ms, base },
                Source::Tokio {
                    base_ms: other_ms,
                    base: other_base,
                },
            ) => base_ms == other_ms && base == other_base,
            (Source::Manual(now), Source::Manual(other)) => Arc::ptr_eq(now, other),
            _ => false,
        }
    }
}

impl Eq for Source {}

impl Clock {
    /// The system's wall clock (the default).
    pub fn system() -> Clock {
        Clock {
            source: Source::System,
        }
    }

    /// Tokio's clock, started at the current wall-clock time. Must be made
    /// inside a Tokio runtime when time is paused (it reads
    /// `tokio::time::Instant::now()`).
    pub fn tokio() -> Clock {
        Clock {
            source: Source::Tokio {
                base_ms: system_ms(SystemTime::now()),
                base: tokio::time::Instant::now(),
            },
        }
    }

    /// A clock that stands still until [`advance`](Clock::advance) moves
    /// it, started at the current wall-clock time rounded down to a whole
    /// second (HTTP dates have whole seconds, so a `Date` made from this
    /// clock is exact). Its clones share its time: give one to the layer,
    /// keep one to move it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use axum::{body::Body, routing::get, Router};
    /// use http::Request;
    /// use tower::ServiceExt;
    /// use tower_fence::{Clock, FenceLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let clock = Clock::manual();
    /// let layer = FenceLayer::builder().clock(clock.clone()).build().unwrap();
    /// let app = Router::new()
    ///     .route("/", get(|| async { ([("cache-control", "max-age=60")], "hello") }))
    ///     .layer(layer);
    /// let get = || async {
    ///     let request = Request::get("/").body(Body::empty()).unwrap();
    ///     let response = app.clone().oneshot(request).await.unwrap();
    ///     let status = response.headers()["cache-status"].to_str().unwrap().to_owned();
    ///     let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    ///     status
    /// };
    ///
    /// assert!(get().await.contains("fwd=uri-miss"));
    /// clock.advance(Duration::from_secs(59));
    /// assert_eq!(get().await, "tower-fence; hit; ttl=1");
    /// clock.advance(Duration::from_secs(1));
    /// assert!(get().await.starts_with("tower-fence; fwd="));
    /// # }
    /// ```
    pub fn manual() -> Clock {
        let now_ms = system_ms(SystemTime::now());
        Clock {
            source: Source::Manual(Arc::new(AtomicU64::new(now_ms - now_ms % 1000))),
        }
    }

    /// Moves a [`manual`](Clock::manual) clock, and every clone of it,
    /// forward by `by` (in whole milliseconds). The system and Tokio clocks
    /// follow their own time and are not moved.
    pub fn advance(&self, by: Duration) {
        if let Source::Manual(now_ms) = &self.source {
            let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
            let _ = now_ms.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                Some(now.saturating_add(by))
            });
        }
    }

    /// The time now, as this clock tells it.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.now_ms())
    }

    /// Milliseconds since the Unix epoch.
    pub(crate) fn now_ms(&self) -> u64 {
        match &self.source {
            Source::System => system_ms(SystemTime::now()),
            Source::Tokio { base_ms, base } => {
                let elapsed = tokio::time::Instant::now().saturating_duration_since(*base);
                base_ms.saturating_add(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
            }
            Source::Manual(now_ms) => now_ms.load(Ordering::Acquire),
        }
    }
}

fn system_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the services of one layer have done, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Requests answered from the cache.
    pub hits: u64,
    /// Cacheable requests that found no usable entry and went to the inner
    /// service.
    pub misses: u64,
    /// Requests that did not consult the cache (method, `Authorization`,
    /// store failure, ...).
    pub bypasses: u64,
    /// Responses written to the store.
    pub stores: u64,
    /// Store calls that failed or timed out.
    pub store_errors: u64,
    /// Stored records that did not decode (deleted, treated as misses).
    pub decode_errors: u64,
    /// Requests answered with the response another request fetched
    /// (in-process single flight).
    pub collapsed: u64,
    /// Stale entries served while one request refreshed them (grace).
    pub stale_hits: u64,
    /// Hits that started an early (XFetch) refresh.
    pub early_refreshes: u64,
    /// Background refreshes that ran (they held the lease).
    pub refreshes: u64,
    /// Rebuilds that waited for another process's fill.
    pub remote_waits: u64,
    /// Waits for another request's rebuild that gave up.
    pub wait_timeouts: u64,
    /// Rebuilt responses not stored because their lease was lost (taken
    /// by an invalidation, or expired).
    pub fenced_out: u64,
    /// Invalidations carried out (prefixes, tags, keys).
    pub invalidations: u64,
    /// Invalidation attempts that failed (retried in the background).
    pub invalidation_errors: u64,
    /// Invalidations given up: dead letters.
    pub invalidations_dead: u64,
    /// Stale entries the origin confirmed with `304 Not Modified`.
    pub revalidated: u64,
    /// Waiters given the error of the rebuild they waited for (as a `502`).
    pub shared_errors: u64,
    /// Times the store's circuit breaker opened.
    pub breaker_opened: u64,
    /// Store calls skipped because the breaker was open.
    pub store_skipped: u64,
    /// Whether the breaker is open now.
    pub breaker_open: bool,
    /// Invalidations of writes not applied yet (the queue retries them);
    /// meanwhile entries generated before them are not served.
    pub invalidations_owed: u64,
    /// Entries found but rebuilt instead of served: generated before a
    /// write whose invalidation was not applied yet.
    pub distrusted: u64,
}

/// The counters behind [`Stats`], each also a metric (see
/// [`crate::metrics`]).
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) bypasses: Counter,
    pub(crate) stores: Counter,
    pub(crate) collapsed: Counter,
    pub(crate) stale_hits: Counter,
    pub(crate) early_refreshes: Counter,
    pub(crate) refreshes: Counter,
    pub(crate) remote_waits: Counter,
    pub(crate) wait_timeouts: Counter,
    pub(crate) fenced_out: Counter,
    pub(crate) invalidations: Counter,
    pub(crate) invalidation_errors: Counter,
    pub(crate) invalidations_dead: Counter,
    pub(crate) revalidated: Counter,
    pub(crate) shared_errors: Counter,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            hits: Counter::new("tower_fence_hits_total"),
            misses: Counter::new("tower_fence_misses_total"),
            bypasses: Counter::new("tower_fence_bypassed_total"),
            stores: Counter::new("tower_fence_stores_total"),
            collapsed: Counter::new("tower_fence_collapsed_total"),
            stale_hits: Counter::new("tower_fence_stale_served_total"),
            early_refreshes: Counter::new("tower_fence_early_refreshes_total"),
            refreshes: Counter::new("tower_fence_refreshes_total"),
            remote_waits: Counter::new("tower_fence_lease_contention_total"),
            wait_timeouts: Counter::new("tower_fence_wait_timeouts_total"),
            fenced_out: Counter::new("tower_fence_fills_rejected_total"),
            invalidations: Counter::new("tower_fence_invalidations_done_total"),
            invalidation_errors: Counter::new("tower_fence_invalidation_errors_total"),
            invalidations_dead: Counter::new("tower_fence_invalidations_dead_total"),
            revalidated: Counter::new("tower_fence_revalidated_total"),
            shared_errors: Counter::new("tower_fence_shared_errors_total"),
        }
    }
}

impl Counters {
    fn snapshot(&self) -> Stats {
        let get = Counter::get;
        Stats {
            hits: get(&self.hits),
            misses: get(&self.misses),
            bypasses: get(&self.bypasses),
            stores: get(&self.stores),
            store_errors: 0,
            decode_errors: 0,
            collapsed: get(&self.collapsed),
            stale_hits: get(&self.stale_hits),
            early_refreshes: get(&self.early_refreshes),
            refreshes: get(&self.refreshes),
            remote_waits: get(&self.remote_waits),
            wait_timeouts: get(&self.wait_timeouts),
            fenced_out: get(&self.fenced_out),
            invalidations: get(&self.invalidations),
            invalidation_errors: get(&self.invalidation_errors),
            invalidations_dead: get(&self.invalidations_dead),
            revalidated: get(&self.revalidated),
            shared_errors: get(&self.shared_errors),
            breaker_opened: 0,
            store_skipped: 0,
            breaker_open: false,
            invalidations_owed: 0,
            distrusted: 0,
        }
    }
}
