//! A sick store costs nothing and loses nothing (issue "Redis may die,
//! stall, fill up or lie"): the circuit breaker, the write budget, and the
//! invalidations a store owes. The store here is the memory store behind a
//! switchboard that makes its calls fail, hang or stall on demand, so every
//! interleaving is forced and time is Tokio's paused clock: the durations
//! asserted are virtual, exact and free of machine noise. The same paths
//! against real `redis-server` processes are in `tests/faults.rs`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_fence::store::{Fill, KeyPattern, MemoryStore, Store, StoreError, StoreFuture};
use tower_fence::{Clock, FenceLayer, FenceLayerBuilder};

/// What the switchboard does to a call.
#[derive(Debug, Default)]
struct Switches {
    /// Every call fails at once, as with a refused connection.
    down: AtomicBool,
    /// Every call hangs until [`Store::reconnect`] (a half-open
    /// connection: only a new one answers).
    half_open: AtomicBool,
    /// Deletes hang for ever (a stalled `SCAN`).
    stall_deletes: AtomicBool,
    /// Deletes fail with an error reply (the store answers).
    refuse_deletes: AtomicBool,
    calls: AtomicUsize,
    reconnects: AtomicUsize,
}

/// The memory store behind [`Switches`].
#[derive(Debug, Clone)]
struct Switchboard {
    inner: Arc<MemoryStore>,
    switches: Arc<Switches>,
}

impl Switchboard {
    fn new() -> Switchboard {
        Switchboard {
            inner: Arc::new(MemoryStore::new(1 << 20)),
            switches: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.switches.calls.load(Ordering::SeqCst)
    }

    fn set(&self, switch: fn(&Switches) -> &AtomicBool, on: bool) {
        switch(&self.switches).store(on, Ordering::SeqCst);
    }

    /// Runs `call` as the switches say. `call` is made only when the gate
    /// opens: the memory store does its work when a call is made, not when
    /// its future is polled.
    fn gate<'a, T: Send + 'a>(
        &'a self,
        delete: bool,
        call: impl FnOnce() -> StoreFuture<'a, T> + Send + 'a,
    ) -> StoreFuture<'a, T> {
        let s = self.switches.clone();
        Box::pin(async move {
            s.calls.fetch_add(1, Ordering::SeqCst);
            if s.down.load(Ordering::SeqCst) {
                return Err(StoreError::unavailable("connection refused"));
            }
            if s.half_open.load(Ordering::SeqCst)
                || (delete && s.stall_deletes.load(Ordering::SeqCst))
            {
                std::future::pending::<()>().await;
            }
            if delete && s.refuse_deletes.load(Ordering::SeqCst) {
                return Err(StoreError::backend("ERR refused"));
            }
            call().await
        })
    }
}

impl Store for Switchboard {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        self.gate(false, move || self.inner.get(key))
    }
    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        self.gate(false, move || self.inner.put(key, record, ttl))
    }
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.gate(true, move || self.inner.delete(key))
    }
    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
        sets: &'a [String],
    ) -> StoreFuture<'a, bool> {
        self.gate(false, move || self.inner.try_lease(key, token, ttl, sets))
    }
    fn extend_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        self.gate(false, move || self.inner.extend_lease(key, token, ttl))
    }
    fn release_lease<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        self.gate(false, move || self.inner.release_lease(key, token))
    }
    fn fill<'a>(&'a self, fill: Fill<'a>) -> StoreFuture<'a, bool> {
        self.gate(false, move || self.inner.fill(fill))
    }
    fn reconnect(&self) {
        self.switches.reconnects.fetch_add(1, Ordering::SeqCst);
        self.switches.half_open.store(false, Ordering::SeqCst);
    }
    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        self.gate(true, move || self.inner.delete_matching(pattern))
    }
    fn delete_members<'a>(&'a self, set: &'a str) -> StoreFuture<'a, u64> {
        self.gate(true, move || self.inner.delete_members(set))
    }
    fn delete_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
    ) -> StoreFuture<'a, u64> {
        self.gate(true, move || {
            self.inner.delete_members_matching(set, pattern)
        })
    }
}

/// An origin with one version per run: `GET /item/{n}` answers
/// `{n}@v{version}` (after the gate, when gated), `POST` moves it on.
#[derive(Clone, Default)]
struct Origin {
    version: Arc<AtomicUsize>,
    gets: Arc<AtomicUsize>,
    gated: Arc<AtomicBool>,
    gate: Arc<Notify>,
}

impl Origin {
    fn current(&self, n: &str) -> String {
        format!("{n}@v{}", self.version.load(Ordering::SeqCst))
    }

    fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    fn router(&self) -> Router {
        async fn read(
            State(o): State<Origin>,
            axum::extract::Path(n): axum::extract::Path<String>,
        ) -> impl IntoResponse {
            o.gets.fetch_add(1, Ordering::SeqCst);
            let body = o.current(&n);
            if o.gated.load(Ordering::SeqCst) {
                o.gate.notified().await;
            }
            ([("cache-control", "max-age=60")], body)
        }
        async fn write(State(o): State<Origin>) -> StatusCode {
            o.version.fetch_add(1, Ordering::SeqCst);
            StatusCode::NO_CONTENT
        }
        Router::new()
            .route("/item/{n}", get(read).post(write))
            .with_state(self.clone())
    }
}

struct Reply {
    status: StatusCode,
    body: String,
    cache_status: String,
}

async fn send(app: &Router, method: Method, uri: &str) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let cache_status = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        cache_status,
    }
}

/// Five `GET`s under `prefix` (one store failure each, with the store
/// down): enough to open the breaker of [`builder`].
async fn fail_until_open(app: &Router, prefix: &str) {
    for i in 0..5 {
        send(app, Method::GET, &format!("{prefix}/{i}")).await;
    }
}

fn builder(store: &Switchboard) -> FenceLayerBuilder {
    FenceLayer::builder()
        .store(store.clone())
        .clock(Clock::tokio())
        .store_timeout(Duration::from_millis(50))
        .breaker_failures(5)
        .breaker_cool_down(Duration::from_secs(1))
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_is_skipped_until_a_probe_finds_it_back() {
    let store = Switchboard::new();
    let origin = Origin::default();
    let layer = builder(&store).build().unwrap();
    let app = origin.router().layer(layer.clone());

    store.set(|s| &s.down, true);
    for i in 0..5 {
        let reply = send(&app, Method::GET, &format!("/item/{i}")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, origin.current(&i.to_string()));
    }
    let stats = layer.stats();
    assert!(stats.breaker_open, "{stats:?}");
    assert_eq!(stats.breaker_opened, 1);
    let calls = store.calls();

    // Open: the store is not called at all, and responses say why.
    for i in 0..20 {
        let reply = send(&app, Method::GET, &format!("/item/{i}")).await;
        assert_eq!(reply.body, origin.current(&i.to_string()));
        assert!(
            reply.cache_status.contains("detail=store-unavailable"),
            "{}",
            reply.cache_status
        );
    }
    assert_eq!(
        store.calls(),
        calls,
        "no store call while the breaker is open"
    );
    assert!(layer.stats().store_skipped >= 20);

    // Back: after the cool-down one request probes, and caching resumes.
    store.set(|s| &s.down, false);
    tokio::time::advance(Duration::from_secs(1)).await;
    send(&app, Method::GET, "/item/a").await;
    assert!(!layer.stats().breaker_open, "{:?}", layer.stats());
    let reply = send(&app, Method::GET, "/item/a").await;
    assert!(reply.cache_status.contains("hit"), "{}", reply.cache_status);
    assert_eq!(reply.body, origin.current("a"));
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_fails_keeps_the_breaker_open_for_another_cool_down() {
    let store = Switchboard::new();
    let origin = Origin::default();
    let layer = builder(&store).build().unwrap();
    let app = origin.router().layer(layer.clone());
    store.set(|s| &s.down, true);
    fail_until_open(&app, "/item").await;
    assert!(layer.stats().breaker_open);
    let calls = store.calls();
    tokio::time::advance(Duration::from_secs(1)).await;
    // One probe, then skipped again.
    for _ in 0..10 {
        send(&app, Method::GET, "/item/x").await;
    }
    assert_eq!(store.calls(), calls + 1, "one probe per cool-down");
    assert!(layer.stats().breaker_open);
}

#[tokio::test(start_paused = true)]
async fn with_the_breaker_open_a_burst_for_one_key_is_one_origin_call() {
    let store = Switchboard::new();
    let origin = Origin::default();
    let layer = builder(&store).build().unwrap();
    let app = origin.router().layer(layer.clone());
    store.set(|s| &s.down, true);
    fail_until_open(&app, "/warm").await;
    assert!(layer.stats().breaker_open);

    let before = origin.gets();
    origin.gated.store(true, Ordering::SeqCst);
    let burst: Vec<_> = (0..100)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, Method::GET, "/item/hot").await })
        })
        .collect();
    // Let every request reach its flight, then let the origin answer.
    while origin.gets() == before {
        tokio::task::yield_now().await;
    }
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    origin.gated.store(false, Ordering::SeqCst);
    origin.gate.notify_waiters();
    for reply in burst {
        let reply = reply.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, origin.current("hot"));
    }
    assert_eq!(origin.gets() - before, 1, "coalesced in process");
}

#[tokio::test(start_paused = true)]
async fn a_half_open_connection_is_dropped_and_the_next_one_answers() {
    let store = Switchboard::new();
    let origin = Origin::default();
    let layer = builder(&store).build().unwrap();
    let app = origin.router().layer(layer.clone());
    store.set(|s| &s.half_open, true);
    for i in 0..5 {
        let started = Instant::now();
        let reply = send(&app, Method::GET, &format!("/item/{i}")).await;
        assert_eq!(reply.body, origin.current(&i.to_string()));
        // The lookup's timeout, then the leader's lease call's (and its
        // release), at most: never more than a few store timeouts.
        assert!(
            started.elapsed() <= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(layer.stats().breaker_open, "{:?}", layer.stats());
    assert_eq!(store.switches.reconnects.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_secs(1)).await;
    send(&app, Method::GET, "/item/z").await;
    assert!(!layer.stats().breaker_open, "the new connection answers");
    let reply = send(&app, Method::GET, "/item/z").await;
    assert!(reply.cache_status.contains("hit"), "{}", reply.cache_status);
}

#[tokio::test(start_paused = true)]
async fn a_write_waits_its_budget_at_most_and_not_at_all_with_the_breaker_open() {
    let store = Switchboard::new();
    let origin = Origin::default();
    let layer = builder(&store)
        .write_budget(Duration::from_millis(30))
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    send(&app, Method::GET, "/item/1").await;

    store.set(|s| &s.stall_deletes, true);
    let started = Instant::now();
    let reply = send(&app, Method::POST, "/item/1").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(30),
        "the budget, exactly"
    );
    assert_eq!(layer.stats().invalidations_owed, 1);
    // This process does not serve what the write replaced.
    let reply = send(&app, Method::GET, "/item/1").await;
    assert_eq!(reply.body, origin.current("1"));

    // Breaker open: the write does not wait at all.
    store.set(|s| &s.down, true);
    fail_until_open(&app, "/other").await;
    assert!(layer.stats().breaker_open);
    let started = Instant::now();
    let reply = send(&app, Method::POST, "/item/2").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(layer.stats().invalidations_owed, 2);
}

/// 20 rounds: the store refuses every delete (it answers, so the breaker
/// stays closed), yet no read after a completed write gets what the write
/// replaced: the entries it could not remove are rebuilt, not served.
#[tokio::test(start_paused = true)]
async fn no_read_in_this_process_is_older_than_a_write_whose_invalidation_failed() {
    let store = Switchboard::new();
    let origin = Origin::default();
    let layer = builder(&store).build().unwrap();
    let app = origin.router().layer(layer.clone());
    store.set(|s| &s.refuse_deletes, true);
    for round in 0..20 {
        let reply = send(&app, Method::GET, "/item/1").await;
        assert_eq!(reply.body, origin.current("1"), "round {round}");
        let reply = send(&app, Method::GET, "/item/1").await;
        assert!(
            reply.cache_status.contains("hit"),
            "round {round}: {} {:?}",
            reply.cache_status,
            layer.stats()
        );
        let reply = send(&app, Method::POST, "/item/1").await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT);
        let reply = send(&app, Method::GET, "/item/1").await;
        assert_eq!(
            reply.body,
            origin.current("1"),
            "round {round}: stale after a write"
        );
        // Entries generated after the write are trusted again.
        tokio::time::advance(Duration::from_secs(2)).await;
    }
    assert!(layer.stats().distrusted >= 20, "{:?}", layer.stats());
    assert!(!layer.stats().breaker_open);
}

/// The store is down during a write; once it is back, the queue applies the
/// invalidation by itself within about 50 ms (it probes the store on its
/// own, not once per cool-down), with no request to trigger it, and another
/// process sharing the store reads the new version.
#[tokio::test(start_paused = true)]
async fn owed_invalidations_are_replayed_when_the_store_is_back() {
    let store = Switchboard::new();
    let origin = Origin::default();
    // A cool-down far longer than the test: only the queue's own probes
    // can find the store back.
    let layer = builder(&store)
        .breaker_cool_down(Duration::from_secs(3600))
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    send(&app, Method::GET, "/item/1").await;
    assert!(send(&app, Method::GET, "/item/1")
        .await
        .cache_status
        .contains("hit"));

    store.set(|s| &s.down, true);
    let reply = send(&app, Method::POST, "/item/1").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(layer.stats().invalidations_owed, 1);
    // Down for 30 s: the queue's retries open the breaker, then wait for
    // the store without using up attempts.
    for _ in 0..300 {
        tokio::time::advance(Duration::from_millis(100)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }
    let stats = layer.stats();
    assert!(stats.breaker_open, "{stats:?}");
    assert_eq!(stats.invalidations_owed, 1);
    assert_eq!(stats.invalidations_dead, 0, "no attempt burnt while open");

    store.set(|s| &s.down, false);
    // The queue probes the store itself every 50 ms while it owes it
    // something: the debt is paid well inside the breaker's 1 s cool-down.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_millis(30)).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(layer.stats().invalidations_owed, 0, "{:?}", layer.stats());

    // Another process on the same store sees the write.
    let other = builder(&store).build().unwrap();
    let other_app = origin.router().layer(other);
    let reply = send(&other_app, Method::GET, "/item/1").await;
    assert_eq!(reply.body, origin.current("1"));
}
