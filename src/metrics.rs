//! What the layer reports to the [`metrics`](https://docs.rs/metrics)
//! facade (feature `metrics`): the names, and the recording the rest of the
//! crate calls. Without the feature every recording compiles to nothing
//! but the counts [`FenceLayer::stats`](crate::FenceLayer::stats) reads.
//!
//! Install any `metrics` recorder (for Prometheus,
//! `metrics-exporter-prometheus`; see `examples/prometheus.rs`) and the
//! layer's metrics appear under these names. Labels stay low-cardinality:
//! the route rule's pattern (`route`, empty when no rule matched), never the
//! raw path; an operation or an outcome from a fixed set.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `tower_fence_requests_total` | counter | `outcome`, `route` | every response, by what the cache did: `hit`, `stale`, `collapsed`, `miss`, `bypass` |
//! | `tower_fence_bypasses_total` | counter | `reason`, `route` | requests that did not use the cache, by `Cache-Status` detail (`method`, `authorization`, `store-timeout`, …) |
//! | `tower_fence_hits_total` | counter | | hits (fresh entries) |
//! | `tower_fence_misses_total` | counter | | cacheable requests that found no usable entry |
//! | `tower_fence_stale_served_total` | counter | | stale entries served while one request refreshed them |
//! | `tower_fence_collapsed_total` | counter | | waiters given another request's rebuild (coalesced) |
//! | `tower_fence_refreshes_total` | counter | | background refreshes that ran (under the lease) |
//! | `tower_fence_early_refreshes_total` | counter | | hits that started an XFetch refresh |
//! | `tower_fence_lease_contention_total` | counter | | rebuilds that found another process's lease and waited for its fill |
//! | `tower_fence_wait_timeouts_total` | counter | | waits for a rebuild that gave up |
//! | `tower_fence_fills_rejected_total` | counter | | rebuilt responses not stored: their lease was lost (an invalidation took it) |
//! | `tower_fence_stores_total` | counter | | responses stored |
//! | `tower_fence_revalidated_total` | counter | | stale entries the origin confirmed with `304` |
//! | `tower_fence_shared_errors_total` | counter | | waiters given their leader's error |
//! | `tower_fence_invalidations_total` | counter | `purge`, `result` | invalidation targets carried out (`hard`/`soft`; `ok`/`error`) |
//! | `tower_fence_invalidated_keys_total` | counter | `purge` | keys an invalidation deleted or marked stale |
//! | `tower_fence_invalidations_dead_total` | counter | | invalidations given up after every retry |
//! | `tower_fence_invalidation_errors_total` | counter | | invalidation attempts that failed (retried) |
//! | `tower_fence_invalidations_done_total` | counter | | invalidation targets carried out |
//! | `tower_fence_bypassed_total` | counter | | requests that did not use the cache (by reason: `tower_fence_bypasses_total`) |
//! | `tower_fence_store_calls_total` | counter | `op`, `result` | store calls (`get`, `fill`, `try_lease`, …; `ok`, `error`, `timeout`, `unavailable`) |
//! | `tower_fence_store_call_seconds` | histogram | `op` | store call latency |
//! | `tower_fence_store_skipped_total` | counter | | store calls skipped by the open circuit breaker |
//! | `tower_fence_breaker_open` | gauge | | 1 while the store's circuit breaker is open, else 0 |
//! | `tower_fence_decode_errors_total` | counter | | stored records that did not decode |
//! | `tower_fence_distrusted_total` | counter | | entries not served: older than an unapplied invalidation |

use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "metrics")]
use std::time::Duration;

/// Every response, by outcome and route.
pub const REQUESTS: &str = "tower_fence_requests_total";
/// Requests that did not use the cache, by reason and route.
pub const BYPASSES: &str = "tower_fence_bypasses_total";
/// Invalidation targets carried out.
pub const INVALIDATIONS: &str = "tower_fence_invalidations_total";
/// Keys invalidations deleted or marked stale.
pub const INVALIDATED_KEYS: &str = "tower_fence_invalidated_keys_total";
/// Store calls, by operation and result.
pub const STORE_CALLS: &str = "tower_fence_store_calls_total";
/// Store call latency, by operation.
pub const STORE_CALL_SECONDS: &str = "tower_fence_store_call_seconds";
/// Store calls skipped by the open breaker.
pub const STORE_SKIPPED: &str = "tower_fence_store_skipped_total";
/// 1 while the breaker is open.
pub const BREAKER_OPEN: &str = "tower_fence_breaker_open";
/// Records that did not decode.
pub const DECODE_ERRORS: &str = "tower_fence_decode_errors_total";
/// Entries distrusted for an unapplied invalidation.
pub const DISTRUSTED: &str = "tower_fence_distrusted_total";

/// One counter of a layer: read by [`FenceLayer::stats`](crate::FenceLayer::stats)
/// and, with the feature `metrics`, also sent to the facade under `name`.
#[derive(Debug)]
pub(crate) struct Counter {
    count: AtomicU64,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    name: &'static str,
}

impl Counter {
    pub(crate) const fn new(name: &'static str) -> Self {
        Counter {
            count: AtomicU64::new(0),
            name,
        }
    }

    /// Counts one.
    pub(crate) fn bump(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(self.name).increment(1);
    }

    /// The count so far.
    pub(crate) fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Counts a facade-only counter (its count is kept elsewhere, if at all).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn count(name: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(name).increment(1);
}

/// One store call: `op` (`get`, `fill`, …), how long it took, and its
/// result (`ok`, `error`, `timeout`, `unavailable`). Called only with the
/// feature (the call is not even timed without it).
#[cfg(feature = "metrics")]
pub(crate) fn store_call(op: &'static str, elapsed: Duration, result: &'static str) {
    metrics::counter!(STORE_CALLS, "op" => op, "result" => result).increment(1);
    metrics::histogram!(STORE_CALL_SECONDS, "op" => op).record(elapsed.as_secs_f64());
}

/// The breaker opened (`true`) or closed.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn breaker(open: bool) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(BREAKER_OPEN).set(if open { 1.0 } else { 0.0 });
}

/// One invalidation target: how (`hard`, `soft`), and how many keys it
/// changed (`None`: it failed).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn invalidation(purge: &'static str, changed: Option<u64>) {
    #[cfg(feature = "metrics")]
    {
        let result = if changed.is_some() { "ok" } else { "error" };
        metrics::counter!(INVALIDATIONS, "purge" => purge, "result" => result).increment(1);
        if let Some(changed) = changed {
            metrics::counter!(INVALIDATED_KEYS, "purge" => purge).increment(changed);
        }
    }
}

/// One response: what the cache did (`outcome`), why it did not use the
/// cache (`reason`, for a bypass), and the route rule's pattern.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn request(outcome: &'static str, reason: Option<&'static str>, route: &str) {
    #[cfg(feature = "metrics")]
    {
        let route = route.to_owned();
        metrics::counter!(REQUESTS, "outcome" => outcome, "route" => route.clone()).increment(1);
        if let Some(reason) = reason {
            metrics::counter!(BYPASSES, "reason" => reason, "route" => route).increment(1);
        }
    }
}
