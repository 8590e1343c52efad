//! [`FenceLayer`] and its builder.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Request, StatusCode};
use tower_layer::Layer;

use crate::error::ConfigError;
use crate::flow::plan;
use crate::invalidate::{
    InvalidationConfig, InvalidationMode, Invalidator, PrefixStrategy, Purge, WriteMethods,
};
use crate::key::{self, KeyConfig};
use crate::policy::rules::{Rule, Rules};
use crate::policy::{ClientCacheControl, PolicyConfig, DEFAULT_CACHEABLE_STATUSES};
use crate::service::FenceService;
use crate::shared::{Clock, Counters, Shared, Stats};
use crate::singleflight::SingleFlight;
use crate::store::{monotonic_ms, MemoryStore, NowMs, Store, TieredStore};
use crate::store_client::StoreClient;

use crate::breaker::Breaker;
pub use crate::breaker::{DEFAULT_BREAKER_COOL_DOWN, DEFAULT_BREAKER_FAILURES};

/// Default key namespace: `tf:`.
pub const DEFAULT_NAMESPACE: &str = "tf:";
/// Default TTL for responses that state no freshness of their own: 60 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Default largest body that is cached: 1 MiB.
pub const DEFAULT_MAX_BODY_SIZE: usize = 1024 * 1024;
/// Default largest gRPC request message read for a key: 64 KiB.
pub const DEFAULT_GRPC_MAX_REQUEST: usize = 64 * 1024;
/// Default longest wait for a gRPC request body to end: 1 s.
pub const DEFAULT_GRPC_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Default longest wait for one store call: 50 ms.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(50);
/// Default longest wait for another request's rebuild: 5 s.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default rebuild lease: 10 s, extended while the rebuild runs.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default poll interval while waiting for another process's fill: 50 ms.
pub const DEFAULT_FILL_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Default XFetch `beta`: 1.0.
pub const DEFAULT_XFETCH_BETA: f64 = 1.0;
/// Default time a key stays hit-for-miss: 10 s.
pub const DEFAULT_HIT_FOR_MISS_TTL: Duration = Duration::from_secs(10);
/// Default bound of one invalidation attempt (one target, inline or
/// queued, or an [`Invalidator`] call): 10 s.
pub const DEFAULT_INVALIDATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a write's response waits for its invalidation: 50 ms.
pub const DEFAULT_WRITE_BUDGET: Duration = Duration::from_millis(50);
/// Default capacity of the background invalidation queue: 10,000.
pub const DEFAULT_INVALIDATION_QUEUE: usize = 10_000;
/// Default attempts of a background invalidation: 8.
pub const DEFAULT_INVALIDATION_ATTEMPTS: u32 = 8;
/// Default tag header: `surrogate-key`.
pub const DEFAULT_TAG_HEADER: &str = "surrogate-key";
/// Default time a stale entry with a validator is kept for revalidation: 60 s.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(60);
/// Default longest rebuild: 30 s. Past it the lease is no longer extended
/// and a rebuild still reading its body hands the rest to its client.
pub const DEFAULT_REBUILD_TIMEOUT: Duration = Duration::from_secs(30);
/// Most keys remembered as hit-for-miss at once.
const HIT_FOR_MISS_CAPACITY: u64 = 100_000;
/// Most rebuilds (and, apart, store reads) in flight at once; past it a
/// request for a new key goes to the origin on its own.
const FLIGHT_CAPACITY: usize = 100_000;

/// Adds HTTP response caching to a service. See the [crate docs](crate).
///
/// Cloning is cheap: every clone, and every [`FenceService`] a clone makes,
/// shares one store and one set of counters (axum calls [`Layer::layer`]
/// once per route).
#[derive(Clone)]
#[must_use]
pub struct FenceLayer {
    shared: Arc<Shared>,
}

impl FenceLayer {
    /// A layer caching in Redis through `pool`, with the default settings.
    ///
    /// ```no_run
    /// use axum::{routing::get, Router};
    /// use bb8_redis::RedisConnectionManager;
    /// use tower_fence::FenceLayer;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = bb8::Pool::builder()
    ///     .build(RedisConnectionManager::new("redis://127.0.0.1:6379")?)
    ///     .await?;
    /// let app: Router = Router::new()
    ///     .route("/", get(|| async { "hello" }))
    ///     .layer(FenceLayer::new(pool));
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn new(pool: crate::store::RedisPool) -> Self {
        Self::with_store(crate::store::RedisStore::new(pool))
    }

    /// A layer caching in process memory (a [`MemoryStore`] of 64 MiB), with
    /// the default settings.
    pub fn memory() -> Self {
        Self::with_store(MemoryStore::default())
    }

    /// A layer caching in `store`, with the default settings.
    pub fn with_store(store: impl Store) -> Self {
        FenceLayer::builder()
            .store(store)
            .build()
            .expect("the default configuration is valid")
    }

    /// A builder for a layer with other settings; its store defaults to a
    /// [`MemoryStore`] of 64 MiB.
    ///
    /// ```
    /// use std::time::Duration;
    /// use http::StatusCode;
    /// use tower_fence::{store::MemoryStore, FenceLayer};
    ///
    /// let layer = FenceLayer::builder()
    ///     .store(MemoryStore::new(16 * 1024 * 1024))
    ///     .namespace("shop:")
    ///     .default_ttl(Duration::from_secs(30))
    ///     .max_body_size(256 * 1024)
    ///     .cacheable_statuses([StatusCode::OK, StatusCode::NOT_FOUND])
    ///     .store_timeout(Duration::from_millis(20))
    ///     .key_header("x-tenant")
    ///     .build()
    ///     .unwrap();
    /// ```
    pub fn builder() -> FenceLayerBuilder {
        FenceLayerBuilder::default()
    }

    /// What the layer's services have done so far, summed over all of them.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// A handle that invalidates entries from application code.
    pub fn invalidator(&self) -> Invalidator {
        Invalidator::new(self.shared.clone())
    }

    /// The store the layer caches in.
    pub fn store(&self) -> &Arc<dyn Store> {
        self.shared.store.store()
    }

    /// The store key `request` is cached under (see the crate docs for its
    /// shape), with its route rule's key parts. `HEAD` and `GET` share a
    /// key. A request whose rule turns caching off, or lacks a key part
    /// the rule needs, still gets the key it would have without the rule.
    ///
    /// ```
    /// use tower_fence::FenceLayer;
    ///
    /// let layer = FenceLayer::memory();
    /// let key = layer.cache_key(&http::Request::get("/users/42?x=1").body(()).unwrap());
    /// assert!(key.starts_with("tf:/users/42#{"));
    /// ```
    pub fn cache_key<B>(&self, request: &Request<B>) -> String {
        plan::key_of_request(&self.shared, request)
            .as_str()
            .to_owned()
    }
}

impl fmt::Debug for FenceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FenceLayer")
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S> Layer<S> for FenceLayer {
    type Service = FenceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FenceService::new(inner, self.shared.clone())
    }
}

/// Builds a [`FenceLayer`]; start with [`FenceLayer::builder`].
#[must_use]
pub struct FenceLayerBuilder {
    store: Option<Arc<dyn Store>>,
    namespace: String,
    default_ttl: Duration,
    grace: Duration,
    max_body_size: usize,
    grpc_max_request: usize,
    grpc_read_timeout: Duration,
    cacheable_statuses: Vec<StatusCode>,
    store_timeout: Option<Duration>,
    key_headers: Vec<String>,
    credential_headers: Vec<String>,
    stale_if_error: Duration,
    wait_timeout: Duration,
    lease_ttl: Duration,
    fill_poll_interval: Duration,
    xfetch_beta: f64,
    keep: Duration,
    hit_for_miss_ttl: Duration,
    prefix_strategy: PrefixStrategy,
    invalidation_mode: InvalidationMode,
    write_methods: WriteMethods,
    invalidation_timeout: Duration,
    write_budget: Duration,
    share_lookups: bool,
    breaker_failures: u32,
    breaker_cool_down: Duration,
    invalidate_root_prefix: bool,
    invalidation_queue: usize,
    invalidation_attempts: u32,
    tag_header: Option<String>,
    forward_tag_header: bool,
    write_purge: Purge,
    heuristic_freshness: Option<(f64, Duration)>,
    client_cache_control: ClientCacheControl,
    rules: Rules,
    rebuild_timeout: Duration,
    clock: Clock,
    local_tier: Option<(u64, Duration)>,
}

impl Default for FenceLayerBuilder {
    fn default() -> Self {
        FenceLayerBuilder {
            store: None,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            default_ttl: DEFAULT_TTL,
            grace: Duration::ZERO,
            max_body_size: DEFAULT_MAX_BODY_SIZE,
            grpc_max_request: DEFAULT_GRPC_MAX_REQUEST,
            grpc_read_timeout: DEFAULT_GRPC_READ_TIMEOUT,
            cacheable_statuses: DEFAULT_CACHEABLE_STATUSES.to_vec(),
            store_timeout: Some(DEFAULT_STORE_TIMEOUT),
            key_headers: Vec::new(),
            credential_headers: Vec::new(),
            stale_if_error: Duration::ZERO,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            lease_ttl: DEFAULT_LEASE_TTL,
            fill_poll_interval: DEFAULT_FILL_POLL_INTERVAL,
            xfetch_beta: DEFAULT_XFETCH_BETA,
            keep: DEFAULT_KEEP,
            hit_for_miss_ttl: DEFAULT_HIT_FOR_MISS_TTL,
            prefix_strategy: PrefixStrategy::default(),
            invalidation_mode: InvalidationMode::default(),
            write_methods: WriteMethods::default(),
            invalidation_timeout: DEFAULT_INVALIDATION_TIMEOUT,
            write_budget: DEFAULT_WRITE_BUDGET,
            share_lookups: false,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cool_down: DEFAULT_BREAKER_COOL_DOWN,
            invalidate_root_prefix: false,
            invalidation_queue: DEFAULT_INVALIDATION_QUEUE,
            invalidation_attempts: DEFAULT_INVALIDATION_ATTEMPTS,
            tag_header: Some(DEFAULT_TAG_HEADER.to_owned()),
            forward_tag_header: false,
            write_purge: Purge::Hard,
            heuristic_freshness: None,
            client_cache_control: ClientCacheControl::default(),
            rules: Rules::new(),
            rebuild_timeout: DEFAULT_REBUILD_TIMEOUT,
            clock: Clock::system(),
            local_tier: None,
        }
    }
}

impl fmt::Debug for FenceLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FenceLayerBuilder")
            .field("store", &self.store)
            .field("namespace", &self.namespace)
            .field("default_ttl", &self.default_ttl)
            .field("grace", &self.grace)
            .field("max_body_size", &self.max_body_size)
            .field("grpc_max_request", &self.grpc_max_request)
            .field("grpc_read_timeout", &self.grpc_read_timeout)
            .field("cacheable_statuses", &self.cacheable_statuses)
            .field("store_timeout", &self.store_timeout)
            .field("key_headers", &self.key_headers)
            .field("credential_headers", &self.credential_headers)
            .field("stale_if_error", &self.stale_if_error)
            .field("wait_timeout", &self.wait_timeout)
            .field("lease_ttl", &self.lease_ttl)
            .field("fill_poll_interval", &self.fill_poll_interval)
            .field("xfetch_beta", &self.xfetch_beta)
            .field("keep", &self.keep)
            .field("hit_for_miss_ttl", &self.hit_for_miss_ttl)
            .field("prefix_strategy", &self.prefix_strategy)
            .field("invalidation_mode", &self.invalidation_mode)
            .field("write_methods", &self.write_methods)
            .field("invalidation_timeout", &self.invalidation_timeout)
            .field("write_budget", &self.write_budget)
            .field("share_lookups", &self.share_lookups)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cool_down", &self.breaker_cool_down)
            .field("invalidate_root_prefix", &self.invalidate_root_prefix)
            .field("invalidation_queue", &self.invalidation_queue)
            .field("invalidation_attempts", &self.invalidation_attempts)
            .field("tag_header", &self.tag_header)
            .field("client_cache_control", &self.client_cache_control)
            .field("rules", &self.rules)
            .field("rebuild_timeout", &self.rebuild_timeout)
            .field("clock", &self.clock)
            .field("local_tier", &self.local_tier)
            .finish()
    }
}

impl FenceLayerBuilder {
    /// The store entries live in. Defaults to a [`MemoryStore`] of 64 MiB.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Caches in Redis through `pool` (a [`RedisStore`](crate::store::RedisStore)).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis(self, pool: crate::store::RedisPool) -> Self {
        self.store(crate::store::RedisStore::new(pool))
    }

    /// Prefix of every key the layer writes, so that several apps can share
    /// one Redis. It may not hold `* ? [ ] \ { } #` nor control characters.
    /// Defaults to `tf:`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long a response that states no freshness of its own
    /// (`Cache-Control: max-age`/`s-maxage`, `Expires`) stays fresh, for the
    /// statuses of [`cacheable_statuses`](Self::cacheable_statuses).
    /// `Duration::ZERO` stores only what the response's headers make
    /// cacheable. Defaults to 60 s.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Grace: how long after it turns stale an entry may still be served
    /// while one background request refreshes it (stale-while-revalidate,
    /// RFC 5861), when the response states no `stale-while-revalidate` of
    /// its own. Never applied to responses with `must-revalidate`,
    /// `proxy-revalidate`. Defaults to 0.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// How long after it turns stale an entry may be served when the origin
    /// fails (an error of the inner service, or a 5xx), when the response
    /// states no `stale-if-error` of its own (RFC 5861). Never applied to
    /// responses with `must-revalidate`, `proxy-revalidate`. Defaults to 0.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = window;
        self
    }

    /// Longest a request waits for another request's rebuild of the same
    /// key (in this process or another) before it serves the stale entry it
    /// has, or goes to the inner service itself. Defaults to 5 s.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// Time to live of a rebuild lease; a running rebuild extends it every
    /// third of it, so a process that dies while rebuilding blocks others
    /// for at most this long. Defaults to 10 s.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// While waiting for another process's rebuild, how often to look at the
    /// store in case a fill notification was missed. Defaults to 50 ms.
    pub fn fill_poll_interval(mut self, interval: Duration) -> Self {
        self.fill_poll_interval = interval;
        self
    }

    /// XFetch's `beta`: how eagerly a hit refreshes its entry in the
    /// background before it expires. A hit refreshes early with a chance
    /// that grows as expiry nears, scaled by how long the entry took to
    /// build; `1.0` is the paper's optimum, larger refreshes earler, `0.0`
    /// turns early refresh off. Defaults to 1.0.
    pub fn xfetch_beta(mut self, beta: f64) -> Self {
        self.xfetch_beta = beta;
        self
    }

    /// How a path prefix is invalidated: [`PrefixStrategy::Scan`] walks the
    /// keyspace (`SCAN` + `UNLINK`), [`PrefixStrategy::Index`] keeps a set
    /// per prefix and reads only it. See [`invalidate`](crate::invalidate).
    /// Defaults to `Scan`.
    pub fn prefix_strategy(mut self, strategy: PrefixStrategy) -> Self {
        self.prefix_strategy = strategy;
        self
    }

    /// Whether a write's invalidation runs before its response is returned
    /// ([`InvalidationMode::Inline`], read-your-writes) or in a bounded
    /// background queue with retries. Defaults to `Inline`.
    pub fn invalidation_mode(mut self, mode: InvalidationMode) -> Self {
        self.invalidation_mode = mode;
        self
    }

    /// The methods whose successful (2xx, 3xx) requests invalidate the paths
    /// they touch. Defaults to every method but `GET`, `HEAD`, `OPTIONS`
    /// and `TRACE` (RFC 9111 §4.4, unknown methods included); an empty list
    /// turns invalidation on writes off.
    pub fn invalidating_methods(mut self, methods: impl IntoIterator<Item = http::Method>) -> Self {
        let methods: Vec<_> = methods.into_iter().collect();
        self.write_methods = if methods.is_empty() {
            WriteMethods::None
        } else {
            WriteMethods::Only(methods)
        };
        self
    }

    /// The bound of one invalidation attempt: one target of a write (which
    /// runs on past the [write budget](Self::write_budget)), one attempt of
    /// the background queue, one [`Invalidator`] call. Defaults to 10 s.
    pub fn invalidation_timeout(mut self, timeout: Duration) -> Self {
        self.invalidation_timeout = timeout;
        self
    }

    /// How long a write's response waits for its inline invalidation: all
    /// its targets (its path, `Location`, `Content-Location`, a rule's
    /// prefixes) run side by side within it. Past it the response is
    /// returned and the targets run on in the background (then, failing,
    /// in the queue); while the store's breaker is open the response does
    /// not wait at all. Until a write's targets are applied, this process
    /// serves no entry generated before the write (they are rebuilt), so
    /// its own reads never see older data; other processes see the write
    /// once the invalidation is applied. Defaults to 50 ms.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = tower_fence::FenceLayer::builder()
    ///     .write_budget(Duration::from_millis(200))
    ///     .build()?;
    /// # Ok::<(), tower_fence::ConfigError>(())
    /// ```
    pub fn write_budget(mut self, budget: Duration) -> Self {
        self.write_budget = budget;
        self
    }

    /// Whether concurrent requests for one key share one store read (one
    /// `GET` per key at a time in this process) instead of reading each
    /// for itself. It spares Redis under bursts for hot keys, at a price:
    /// a request may then get the result of a read that started up to one
    /// store round trip before a write *of another process* finished (the
    /// writes of this process are never crossed), an entry that write had
    /// just invalidated. Off by default: every read after a write that
    /// finished, in any process, sees it.
    ///
    /// ```
    /// let layer = tower_fence::FenceLayer::builder()
    ///     .share_lookups(true)
    ///     .build()?;
    /// # Ok::<(), tower_fence::ConfigError>(())
    /// ```
    pub fn share_lookups(mut self, share: bool) -> Self {
        self.share_lookups = share;
        self
    }

    /// Consecutive failed store calls (timeouts, connection errors; not
    /// error replies) that open the circuit breaker: while it is open the
    /// store is skipped, requests go to the inner service (still one per
    /// key in this process) with `Cache-Status: …; detail=store-unavailable`,
    /// and writes do not wait for their invalidation. After the
    /// [cool-down](Self::breaker_cool_down) one call probes the store; if
    /// it answers, the breaker closes. Opening also drops the store's
    /// connection ([`Store::reconnect`]), so a half-open one is not used
    /// again. `0` turns the breaker off. Defaults to 5.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = tower_fence::FenceLayer::builder()
    ///     .breaker_failures(3)
    ///     .breaker_cool_down(Duration::from_millis(500))
    ///     .build()?;
    /// # Ok::<(), tower_fence::ConfigError>(())
    /// ```
    pub fn breaker_failures(mut self, failures: u32) -> Self {
        self.breaker_failures = failures;
        self
    }

    /// How long an open circuit breaker skips the store before it lets one
    /// probe through (see [`breaker_failures`](Self::breaker_failures)).
    /// Defaults to 1 s.
    pub fn breaker_cool_down(mut self, cool_down: Duration) -> Self {
        self.breaker_cool_down = cool_down;
        self
    }

    /// Whether a write to `/` invalidates the whole cache (`true`), as a
    /// write to any other path invalidates what is under it, or only the
    /// entries of `/` itself (`false`), so that a form posted to `/` does
    /// not flush everything. A rule's `invalidate(["/"])` and
    /// [`Invalidator::invalidate_prefix("/")`](Invalidator::invalidate_prefix)
    /// flush everything either way. Defaults to `false`.
    ///
    /// ```
    /// let layer = tower_fence::FenceLayer::builder()
    ///     .invalidate_root_prefix(true)
    ///     .build()?;
    /// # Ok::<(), tower_fence::ConfigError>(())
    /// ```
    pub fn invalidate_root_prefix(mut self, whole_cache: bool) -> Self {
        self.invalidate_root_prefix = whole_cache;
        self
    }

    /// Capacity of the background invalidation queue; past it an
    /// invalidation becomes a dead letter. Defaults to 10,000.
    pub fn invalidation_queue(mut self, capacity: usize) -> Self {
        self.invalidation_queue = capacity;
        self
    }

    /// How often the background queue tries an invalidation before it
    /// becomes a dead letter. Defaults to 8.
    pub fn invalidation_attempts(mut self, attempts: u32) -> Self {
        self.invalidation_attempts = attempts;
        self
    }

    /// The response header that names an entry's tags (space or comma
    /// separated); it does not leave the layer unless
    /// [`forward_tag_header`](Self::forward_tag_header). `None` turns tags
    /// off. Defaults to `Surrogate-Key`.
    pub fn tag_header(mut self, name: impl Into<Option<String>>) -> Self {
        self.tag_header = name.into();
        self
    }

    /// Heuristic freshness (RFC 9111 §4.2.2), off by default: a response
    /// that states no freshness (no `max-age`, `s-maxage` or `Expires`),
    /// with a status that may be cached without one, and a
    /// `Last-Modified`, is fresh for `fraction` of the time since it was
    /// last modified (10 % is usual), at most `cap`; without
    /// `Last-Modified` the default TTL applies as before. A route's own TTL
    /// wins. `fraction` must be in `(0, 1]`.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = tower_fence::FenceLayer::builder()
    ///     .heuristic_freshness(0.1, Duration::from_secs(24 * 3600))
    ///     .build()?;
    /// # Ok::<(), tower_fence::ConfigError>(())
    /// ```
    pub fn heuristic_freshness(mut self, fraction: f64, cap: Duration) -> Self {
        self.heuristic_freshness = Some((fraction, cap));
        self
    }

    /// Whether the tag header goes on to the client, stored with the entry
    /// and sent on hits too, instead of being stripped: for a CDN in front
    /// of the layer (Fastly and the like) that purges by surrogate key.
    /// The layer indexes the tags either way. Defaults to `false`.
    ///
    /// ```
    /// let layer = tower_fence::FenceLayer::builder()
    ///     .forward_tag_header(true)
    ///     .build()?;
    /// # Ok::<(), tower_fence::ConfigError>(())
    /// ```
    pub fn forward_tag_header(mut self, forward: bool) -> Self {
        self.forward_tag_header = forward;
        self
    }

    /// How a write's invalidation purges what it touches:
    /// [`Purge::Hard`] deletes it (the next read waits for the origin, and
    /// no read after the write's response sees data from before it), or
    /// [`Purge::Soft`] marks it stale (within grace the next reads are
    /// served the old response while one refresh runs: no stampede after a
    /// busy write, but a client may not read its own write at once).
    /// Leases are deleted either way. An
    /// [`Invalidator`](crate::Invalidator) purges hard unless asked
    /// ([`Invalidator::soft`](crate::Invalidator::soft)). Defaults to
    /// `Purge::Hard`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_fence::invalidate::Purge;
    ///
    /// let layer = tower_fence::FenceLayer::builder()
    ///     .grace(Duration::from_secs(30))
    ///     .write_purge(Purge::Soft)
    ///     .build()?;
    /// # Ok::<(), tower_fence::ConfigError>(())
    /// ```
    pub fn write_purge(mut self, purge: Purge) -> Self {
        self.write_purge = purge;
        self
    }

    /// How far the client's own `Cache-Control` and `Pragma` are obeyed:
    /// [`ClientCacheControl::Obey`] follows RFC 9111 §5.2.1 (a client's
    /// `no-cache` or `max-age=0` sends its request to the origin, as a
    /// revalidation); [`ClientCacheControl::IgnoreRevalidation`] keeps
    /// clients from busting the cache at will. Defaults to `Obey`.
    pub fn client_cache_control(mut self, obey: ClientCacheControl) -> Self {
        self.client_cache_control = obey;
        self
    }

    /// Adds a route rule; the first rule that matches a request decides how
    /// it is cached (see [`Rule`]). Rules are checked when the layer is
    /// built.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_fence::policy::rules::Rule;
    /// use tower_fence::FenceLayer;
    ///
    /// let layer = FenceLayer::builder()
    ///     .rule(Rule::path("/users/{id}").ttl(Duration::from_secs(30)).tags(["user-{id}"]))
    ///     .rule(Rule::prefix("/admin").off())
    ///     .build()
    ///     .unwrap();
    /// ```
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Adds route rules, in order (see [`rule`](Self::rule)).
    pub fn rules(mut self, rules: impl IntoIterator<Item = Rule>) -> Self {
        self.rules.extend(rules);
        self
    }

    /// Keep: how long past its freshness an entry with a validator (`ETag`,
    /// `Last-Modified`) stays stored, so that it can be revalidated with a
    /// conditional request (a `304` costs no body) and serve `max-stale`
    /// requests. It is never served stale on its own account: only grace,
    /// stale-if-error and the client's `max-stale` do that. Defaults to
    /// 60 s.
    pub fn keep(mut self, keep: Duration) -> Self {
        self.keep = keep;
        self
    }

    /// How long a key whose rebuild could not be shared (a `private`,
    /// `Set-Cookie` or too large response) is remembered, so that its
    /// requests go straight to the inner service instead of queueing behind
    /// one another (hit-for-miss). Defaults to 10 s.
    pub fn hit_for_miss_ttl(mut self, ttl: Duration) -> Self {
        self.hit_for_miss_ttl = ttl;
        self
    }

    /// Largest response body that is cached, in bytes. A larger response is
    /// streamed to the client untouched and not stored; the layer never
    /// holds more than this many bytes of one response. Defaults to 1 MiB.
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body_size = bytes;
        self
    }

    /// Largest request body of a gRPC call a
    /// [`Rule::grpc`](crate::policy::rules::Rule::grpc) caches that is read
    /// to key the call, in bytes. A larger one is handed on as it came and
    /// the call is not cached (`detail=request-too-large`). Defaults to
    /// 64 KiB.
    pub fn grpc_max_request(mut self, bytes: usize) -> Self {
        self.grpc_max_request = bytes;
        self
    }

    /// Longest the layer waits for the request body of a gRPC call a
    /// [`Rule::grpc`](crate::policy::rules::Rule::grpc) caches to end. A
    /// unary call's body ends right after its one message; a streaming call
    /// named by a rule by mistake is handed on, as it came, once this runs
    /// out (`detail=request-timeout`), so it is delayed, never stuck.
    /// Defaults to 1 s.
    pub fn grpc_read_timeout(mut self, timeout: Duration) -> Self {
        self.grpc_read_timeout = timeout;
        self
    }

    /// Statuses cached under the [default TTL](Self::default_ttl) when the
    /// response states no freshness. A response that does state it is cached
    /// whatever its final status (RFC 9111 §3), except `206` and `304`.
    /// Defaults to RFC 9110 §15.1's heuristically cacheable codes without
    /// `206`: 200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501.
    pub fn cacheable_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.cacheable_statuses = statuses.into_iter().collect();
        self
    }

    /// Longest a store call may take before the request goes to the inner
    /// service (fail open). Defaults to 50 ms; `None` waits as long as the
    /// store does.
    pub fn store_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.store_timeout = timeout.into();
        self
    }

    /// Longest a rebuild holds its key: its lease is extended while the
    /// inner service works, up to this long, then left to expire (so a
    /// hanging origin holds no key for ever), and a rebuild still reading
    /// its body then hands the rest to its own client and shares nothing.
    /// The leader's own request is not cut: it gets the origin's answer
    /// whenever it comes. Defaults to 30 s.
    pub fn rebuild_timeout(mut self, timeout: Duration) -> Self {
        self.rebuild_timeout = timeout;
        self
    }

    /// Keeps a local tier in this process in front of the store: records
    /// read from the store are kept here, at most `capacity_bytes` of them
    /// (keys and records) and each at most `ttl`, and served without a
    /// round trip. Off by default; meant for a shared store (Redis), whose
    /// hottest hits then cost no network.
    ///
    /// # Coherence, and its bound
    ///
    /// Every fill and invalidation of *this* process drops the local copies
    /// it touches before it completes, so in this process a read never
    /// returns data older than a write whose response has left the layer.
    /// Other processes drop their copies when their store's change feed
    /// ([`Store::watch_changes`]; the Redis stores' fill feed, which carries
    /// fills and invalidations) tells them: a round trip or so after the
    /// change while the feed is connected. A process whose feed breaks
    /// drops every copy and keeps none until it reads the feed again; a
    /// change that never reaches it (lost, or on a store with no feed) is
    /// seen at the latest when the copy's `ttl` ends. So across processes a
    /// read may be up to `ttl` older than a completed write: weaker than
    /// the layer's guarantee without the tier, and why it is opt-in. Keep
    /// `ttl` short (seconds).
    ///
    /// A prefix or tag invalidation drops every local copy (the tier does
    /// not know which keys a prefix or tag covers).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_fence::FenceLayer;
    ///
    /// let layer = FenceLayer::builder()
    ///     .local_tier(16 * 1024 * 1024, Duration::from_secs(2))
    ///     .build()
    ///     .unwrap();
    /// ```
    pub fn local_tier(mut self, capacity_bytes: u64, ttl: Duration) -> Self {
        self.local_tier = Some((capacity_bytes, ttl));
        self
    }

    /// Where the time of day comes from. Defaults to [`Clock::system`];
    /// tests that pause Tokio's time use [`Clock::tokio`], tests over real
    /// sockets [`Clock::manual`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Adds a request header whose values become part of the key, such as a
    /// tenant id or a language: requests that differ in it are cached apart.
    ///
    /// # Key every header the response depends on
    ///
    /// Of the request, the key holds only the method class, the host
    /// (`Host`, or the target's authority), the path, the query and the key
    /// headers. So every request header the inner service's response
    /// depends on must be either a key header (this method for every route,
    /// [`Rule::key_header`](crate::policy::rules::Rule::key_header) for
    /// some) or named in the response's `Vary` (the layer then keeps the
    /// variants side by side). Otherwise the first request that sends the
    /// header fills the entry, and every later request, with the header or
    /// without, is served that response: one request poisons the entry for
    /// everyone. `Vary` works only where the app remembers to send it; a key
    /// header also covers the responses that forget.
    ///
    /// `X-Forwarded-Host` is the usual culprit: behind a proxy, frameworks
    /// build absolute links, redirects and canonical URLs from it (and from
    /// `X-Forwarded-Proto`, `X-Forwarded-Port`, `Forwarded`). Either make
    /// sure the proxy in front drops what clients send under those names
    /// and sets them itself (then `X-Forwarded-Host` is the host, which is
    /// in the key), or key on them:
    ///
    /// ```
    /// use tower_fence::FenceLayer;
    ///
    /// let layer = FenceLayer::builder()
    ///     .key_header("x-forwarded-host")
    ///     .key_header("x-forwarded-proto")
    ///     .key_header("x-forwarded-port")
    ///     .build()
    ///     .unwrap();
    /// ```
    ///
    /// Each distinct value is an entry of its own: keying on a header whose
    /// value differs per client, such as `X-Forwarded-For` or `Forwarded`
    /// (its `for=`), caches per client. The `proxy` example does both: by
    /// default it sets the forwarding headers itself, and with
    /// `--trust-forwarded` it keeps the client's and keys on them.
    pub fn key_header(mut self, name: impl Into<String>) -> Self {
        self.key_headers.push(name.into());
        self
    }

    /// Adds a request header that carries a credential, as `Cookie` does
    /// (an API key, a session token, a header set by an auth proxy): a
    /// response to a request with it may be that user's page, so it is
    /// stored, and served to other requests, only when it says it may be
    /// shared (`public` or `s-maxage`), or on a route whose
    /// [rule](crate::policy::rules::Rule) keys by cookie or
    /// [shares cookies](crate::policy::rules::Rule::share_cookies); and a
    /// request with it is served only entries stored that way. May be
    /// called several times; a name that is not a header name is a
    /// configuration error.
    ///
    /// Defaults to none: `Cookie` alone (`Authorization` has rules of its
    /// own, RFC 9111 §3.5).
    ///
    /// ```
    /// use tower_fence::FenceLayer;
    ///
    /// let layer = FenceLayer::builder()
    ///     .credential_header("x-api-key")
    ///     .credential_header("x-forwarded-user")
    ///     .build()
    ///     .unwrap();
    /// ```
    pub fn credential_header(mut self, name: impl Into<String>) -> Self {
        self.credential_headers.push(name.into());
        self
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] when the namespace holds a forbidden character, or
    /// a key header or credential header is not a valid header name.
    pub fn build(self) -> Result<FenceLayer, ConfigError> {
        if !key::valid_namespace(&self.namespace) {
            return Err(ConfigError::new(format!(
                "namespace {:?} holds a glob, brace, `#` or control character",
                self.namespace
            )));
        }
        let headers = self
            .key_headers
            .iter()
            .map(|name| {
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    ConfigError::new(format!("key header {name:?} is not a header name"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut credential_headers = Vec::with_capacity(self.credential_headers.len());
        for name in &self.credential_headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError::new(format!("credential header {name:?} is not a header name"))
            })?;
            if !credential_headers.contains(&name) {
                credential_headers.push(name);
            }
        }
        if !(self.xfetch_beta.is_finite() && self.xfetch_beta >= 0.0) {
            return Err(ConfigError::new(format!(
                "xfetch_beta must be a finite number >= 0, not {}",
                self.xfetch_beta
            )));
        }
        self.rules.validate()?;
        self.rules.announce_grpc();
        if let Some((fraction, _)) = self.heuristic_freshness {
            if !(fraction.is_finite() && fraction > 0.0 && fraction <= 1.0) {
                return Err(ConfigError::new(format!(
                    "heuristic_freshness fraction must be in (0, 1], not {fraction}"
                )));
            }
        }
        if self.lease_ttl.is_zero() {
            return Err(ConfigError::new("lease_ttl must be longer than zero"));
        }
        if self.fill_poll_interval.is_zero() {
            return Err(ConfigError::new(
                "fill_poll_interval must be longer than zero",
            ));
        }
        let tag_header = match &self.tag_header {
            None => None,
            Some(name) => Some(HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError::new(format!("tag header {name:?} is not a header name"))
            })?),
        };
        let mut store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::default()));
        if let Some((capacity_bytes, ttl)) = self.local_tier {
            // The tier's TTL follows a test clock; the system clock's
            // time of day may jump, so then a monotonic one.
            let now_ms: NowMs = if self.clock == Clock::system() {
                monotonic_ms()
            } else {
                let clock = self.clock.clone();
                Arc::new(move || clock.now_ms())
            };
            store = Arc::new(TieredStore::new(store, capacity_bytes, ttl, now_ms));
        }
        let hit_for_miss = moka::sync::Cache::builder()
            .max_capacity(HIT_FOR_MISS_CAPACITY)
            .time_to_live(self.hit_for_miss_ttl.max(Duration::from_millis(1)))
            .build();
        Ok(FenceLayer {
            shared: Arc::new(Shared {
                store: Arc::new(StoreClient::new(
                    store,
                    self.store_timeout,
                    Breaker::new(self.breaker_failures, self.breaker_cool_down),
                )),
                key: KeyConfig {
                    namespace: self.namespace,
                    headers,
                },
                policy: PolicyConfig {
                    default_ttl: self.default_ttl,
                    heuristic: self.heuristic_freshness,
                    grace: self.grace,
                    stale_if_error: self.stale_if_error,
                    cacheable_statuses: self.cacheable_statuses,
                    credential_headers,
                },
                max_body_size: self.max_body_size,
                grpc_max_request: self.grpc_max_request,
                grpc_read_timeout: self.grpc_read_timeout,
                wait_timeout: self.wait_timeout,
                rebuild_timeout: self.rebuild_timeout.max(Duration::from_millis(1)),
                lease_ttl: self.lease_ttl,
                fill_poll_interval: self.fill_poll_interval,
                xfetch_beta: self.xfetch_beta,
                keep: self.keep,
                flights: Arc::new(SingleFlight::new(FLIGHT_CAPACITY)),
                lookups: Arc::new(SingleFlight::new(FLIGHT_CAPACITY)),
                share_lookups: self.share_lookups,
                hit_for_miss,
                invalidation: InvalidationConfig {
                    strategy: self.prefix_strategy,
                    mode: self.invalidation_mode,
                    methods: self.write_methods,
                    timeout: self.invalidation_timeout,
                    write_budget: self.write_budget,
                    root_prefix: self.invalidate_root_prefix,
                    queue_capacity: self.invalidation_queue,
                    max_attempts: self.invalidation_attempts.max(1),
                    tags_in_use: tag_header.is_some() || self.rules.any_tags(),
                    forward_tags: self.forward_tag_header,
                    purge: self.write_purge,
                    tag_header,
                    queue: std::sync::OnceLock::new(),
                    running: std::sync::atomic::AtomicUsize::new(0),
                    dead_letters: std::sync::Mutex::new(std::collections::VecDeque::new()),
                },
                client_cache_control: self.client_cache_control,
                rules: self.rules,
                counters: Counters::default(),
                clock: self.clock,
                write_epoch: AtomicU64::new(0),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_namespace_and_key_header_are_config_errors() {
        assert!(FenceLayer::builder().namespace("a*").build().is_err());
        assert!(FenceLayer::builder().namespace("{x}").build().is_err());
        assert!(FenceLayer::builder()
            .key_header("bad header")
            .build()
            .is_err());
        assert!(FenceLayer::builder().namespace("app:v1:").build().is_ok());
    }

    #[test]
    fn credential_headers_are_validated_and_kept() {
        for bad in ["bad header", "", "x:y"] {
            let err = FenceLayer::builder()
                .credential_header(bad)
                .build()
                .unwrap_err();
            assert!(err.to_string().contains("credential header"), "{err}");
        }
        let layer = FenceLayer::builder()
            .credential_header("X-Api-Key")
            .credential_header("x-api-key")
            .credential_header("x-forwarded-user")
            .build()
            .unwrap();
        assert_eq!(
            layer.shared.policy.credential_headers,
            [
                HeaderName::from_static("x-api-key"),
                HeaderName::from_static("x-forwarded-user")
            ]
        );
        assert!(FenceLayer::memory()
            .shared
            .policy
            .credential_headers
            .is_empty());
    }
}
