//! The request's way on its edges (issue "One flow, safe by default"): a
//! failing inner service, a wait that runs out, a write that lands during
//! a rebuild, personal requests that rebuild alone, and leaders that stream.
//! Interleavings are forced with gates (`Notify`, semaphores), not sleeps;
//! each test counts origin calls and compares bodies with the origin's
//! version.
//!
//! Issue 9 ("0 reads older than a completed write, in every path, repeated
//! 20 times each") has one 20-round write-against-rebuild race per path and
//! store: a leader joined after the write, a relief leader, hit-for-miss
//! requests that go alone, and a leader that did not get the key's lease
//! (held elsewhere past the wait, or the lease call failed).

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use support::RedisProcess;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tower::{service_fn, ServiceExt};
use tower_fence::store::{
    FillSubscription, KeyPattern, MemoryStore, RedisStore, Store, StoreError, StoreFuture,
};
use tower_fence::{FenceLayer, FenceLayerBuilder, Stats};

/// An origin whose `GET /item` answers the current version (`private`
/// while `private` is set), held inside after reading it while `gated` is
/// set until the test lets it go, and whose `POST /item` moves the version
/// on.
#[derive(Clone)]
struct Versioned {
    version: Arc<AtomicUsize>,
    gets: Arc<AtomicUsize>,
    gated: Arc<AtomicBool>,
    private: Arc<AtomicBool>,
    /// A permit for each gated `GET` that is inside (semaphores count, so
    /// two calls that enter together are two).
    inside: Arc<Semaphore>,
    /// A permit for each gated `GET` let go.
    gate: Arc<Semaphore>,
}

impl Default for Versioned {
    fn default() -> Self {
        Versioned {
            version: Arc::default(),
            gets: Arc::default(),
            gated: Arc::default(),
            private: Arc::default(),
            inside: Arc::new(Semaphore::new(0)),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Versioned {
    fn current(&self) -> String {
        format!("v{}", self.version.load(Ordering::SeqCst))
    }

    /// `GET`s served so far.
    fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// Waits until one more gated `GET` is inside (it has read the
    /// version); panics with `what` if none comes within 10 s: the request
    /// took another path than the test expects.
    async fn entered(&self, what: &str) {
        let permit = tokio::time::timeout(Duration::from_secs(10), self.inside.acquire())
            .await
            .unwrap_or_else(|_| panic!("no origin call: {what}"))
            .expect("the semaphore is never closed");
        permit.forget();
    }

    /// Lets `n` gated `GET`s answer, each with the version it read.
    fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    fn router(&self) -> Router {
        async fn read(State(o): State<Versioned>, headers: HeaderMap) -> impl IntoResponse {
            o.gets.fetch_add(1, Ordering::SeqCst);
            let version = o.version.load(Ordering::SeqCst);
            if o.gated.load(Ordering::SeqCst) {
                o.inside.add_permits(1);
                o.gate
                    .acquire()
                    .await
                    .expect("the semaphore is never closed")
                    .forget();
            }
            let cc = if o.private.load(Ordering::SeqCst) {
                "private, max-age=60"
            } else if headers.contains_key("authorization") {
                "public, max-age=60"
            } else {
                "max-age=60"
            };
            ([("cache-control", cc)], format!("v{version}"))
        }
        async fn write(State(o): State<Versioned>) -> StatusCode {
            o.version.fetch_add(1, Ordering::SeqCst);
            StatusCode::NO_CONTENT
        }
        Router::new()
            .route("/item", get(read).post(write))
            .with_state(self.clone())
    }
}

async fn send(app: &Router, method: Method, uri: &str, auth: bool) -> (StatusCode, String, String) {
    let mut req = Request::builder().method(method).uri(uri);
    if auth {
        req = req.header("authorization", "Bearer a");
    }
    let response = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let cache_status = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        cache_status,
    )
}

async fn stores() -> Vec<(&'static str, FenceLayerBuilder, Option<RedisProcess>)> {
    let redis = RedisProcess::start_async().await;
    let pool = redis.pool().await;
    vec![
        ("memory", FenceLayer::builder(), None),
        (
            "redis",
            FenceLayer::builder()
                .redis(pool)
                .store_timeout(Duration::from_secs(2)),
            Some(redis),
        ),
    ]
}

/// The stores of [`stores`], each behind a [`Refusing`] handle the test
/// keeps to refuse the lease of one key.
async fn refusing_stores() -> Vec<(
    &'static str,
    FenceLayerBuilder,
    Arc<Refusing>,
    Option<RedisProcess>,
)> {
    let redis = RedisProcess::start_async().await;
    let pool = redis.pool().await;
    let memory = Refusing::around(Arc::new(MemoryStore::default()));
    let remote = Refusing::around(Arc::new(RedisStore::new(pool)));
    vec![
        (
            "memory",
            FenceLayer::builder().store(memory.clone()),
            memory,
            None,
        ),
        (
            "redis",
            FenceLayer::builder()
                .store(remote.clone())
                .store_timeout(Duration::from_secs(2)),
            remote,
            Some(redis),
        ),
    ]
}

/// How a [`Refusing`] store answers for the lease of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Another process holds it (`Ok(false)`), past the wait.
    Held,
    /// Another process holds it, then the store fails (`Err`) every time
    /// the waiting leader tries again.
    HeldThenFailing,
    /// The store fails at once (`Err`).
    Failing,
}

/// A store that, while armed, refuses the lease of one key as
/// [`Refusal`] says; permits (leases of their own) and every other call go
/// to the store inside.
#[derive(Debug)]
struct Refusing {
    inner: Arc<dyn Store>,
    key: Mutex<String>,
    armed: Mutex<Option<Refusal>>,
    /// Lease calls for the key answered since the store was armed.
    calls: AtomicUsize,
}

impl Refusing {
    fn around(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Refusing {
            inner,
            key: Mutex::new(String::new()),
            armed: Mutex::new(None),
            calls: AtomicUsize::new(0),
        })
    }

    /// Refuses the lease of `key` as `refusal` says, until [`Self::disarm`].
    fn arm(&self, key: &str, refusal: Refusal) {
        *self.key.lock().unwrap() = key.to_owned();
        self.calls.store(0, Ordering::SeqCst);
        *self.armed.lock().unwrap() = Some(refusal);
    }

    fn disarm(&self) {
        *self.armed.lock().unwrap() = None;
    }

    /// What to answer for a lease call on `key`, if not the inner store's.
    fn refusal(&self, key: &str) -> Option<Result<bool, StoreError>> {
        let armed = (*self.armed.lock().unwrap())?;
        if key != *self.key.lock().unwrap() {
            return None;
        }
        let first = self.calls.fetch_add(1, Ordering::SeqCst) == 0;
        let failed = || Err(StoreError::backend("the test's store fails lease calls"));
        Some(match armed {
            Refusal::Held => Ok(false),
            Refusal::HeldThenFailing if first => Ok(false),
            Refusal::HeldThenFailing | Refusal::Failing => failed(),
        })
    }
}

impl Store for Refusing {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        self.inner.get(key)
    }

    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        self.inner.put(key, record, ttl)
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.inner.delete(key)
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
        sets: &'a [String],
    ) -> StoreFuture<'a, bool> {
        match self.refusal(key) {
            Some(answer) => Box::pin(std::future::ready(answer)),
            None => self.inner.try_lease(key, token, ttl, sets),
        }
    }

    fn extend_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        self.inner.extend_lease(key, token, ttl)
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        self.inner.release_lease(key, token)
    }

    fn fill<'a>(&'a self, fill: tower_fence::store::Fill<'a>) -> StoreFuture<'a, bool> {
        self.inner.fill(fill)
    }

    fn subscribe_fill(&self, key: &str) -> Option<FillSubscription> {
        self.inner.subscribe_fill(key)
    }

    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        self.inner.delete_matching(pattern)
    }

    fn delete_members<'a>(&'a self, set: &'a str) -> StoreFuture<'a, u64> {
        self.inner.delete_members(set)
    }

    fn delete_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
    ) -> StoreFuture<'a, u64> {
        self.inner.delete_members_matching(set, pattern)
    }
}

/// Sends `GET /item` in a task of its own.
fn spawn_get(app: &Router) -> JoinHandle<(StatusCode, String, String)> {
    let app = app.clone();
    tokio::spawn(async move { send(&app, Method::GET, "/item", false).await })
}

/// Fills the layer has settled: stored, or fenced out.
fn settled(stats: &Stats) -> u64 {
    stats.stores + stats.fenced_out
}

/// Waits until the layer has settled `n` fills more than in `before`: a
/// request that went to the origin alone stores its response once its
/// client has read it, on Redis in a task of its own. Polls the counters;
/// panics after 10 s.
async fn settle(layer: &FenceLayer, before: &Stats, n: u64) -> Stats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = layer.stats();
        if settled(&stats) >= settled(before) + n {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} fills settled: {stats:?}",
            settled(&stats) - settled(before)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A `GET` that arrives after a `POST` completed never gets data read
/// before it: neither by joining a rebuild that started before the write,
/// nor from a fill of such a rebuild. 20 rounds on each store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_after_a_completed_write_is_older_than_it() {
    for (name, builder, _redis) in stores().await {
        let origin = Versioned::default();
        // Joining the stalled rebuild would wait this long: the reads below
        // must not.
        let layer = builder
            .wait_timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let app = origin.router().layer(layer);
        for round in 0..20 {
            // Start from a miss: a write clears what the last round stored.
            send(&app, Method::POST, "/item", false).await;
            // A rebuild starts and stalls inside the origin.
            origin.gated.store(true, Ordering::SeqCst);
            let early = tokio::spawn({
                let app = app.clone();
                async move { send(&app, Method::GET, "/item", false).await }
            });
            origin.entered("the rebuild calls the origin").await;
            origin.gated.store(false, Ordering::SeqCst);
            // The write completes meanwhile.
            let (status, _, _) = send(&app, Method::POST, "/item", false).await;
            assert_eq!(status, StatusCode::NO_CONTENT);
            let after_write = origin.current();
            // A read that starts now must see the write: it does not join
            // the stalled rebuild (it would hang there).
            let late = send(&app, Method::GET, "/item", false);
            let (_, body, cache_status) = tokio::time::timeout(Duration::from_secs(10), late)
                .await
                .expect("a read after a write joins no rebuild from before it");
            assert_eq!(body, after_write, "{name} round {round}: {cache_status}");
            origin.release(1);
            let _ = early.await.unwrap();
            // And nothing older was stored.
            let (_, body, cache_status) = send(&app, Method::GET, "/item", false).await;
            assert_eq!(body, after_write, "{name} round {round}: {cache_status}");
        }
    }
}

/// A request with credentials rebuilds alone; its fill is fenced by a
/// permit, so a write during its origin call keeps the old body out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_personal_rebuild_is_fenced_by_its_permit() {
    for (name, builder, _redis) in stores().await {
        let origin = Versioned::default();
        let layer = builder.build().unwrap();
        let app = origin.router().layer(layer.clone());
        let before = layer.stats();
        origin.gated.store(true, Ordering::SeqCst);
        let early = tokio::spawn({
            let app = app.clone();
            async move { send(&app, Method::GET, "/item", true).await }
        });
        origin
            .entered("the personal rebuild calls the origin")
            .await;
        origin.gated.store(false, Ordering::SeqCst);
        send(&app, Method::POST, "/item", false).await;
        origin.release(1);
        let (_, old, _) = early.await.unwrap();
        assert_eq!(old, "v0");
        // Its fill runs behind its response (on Redis in a task of its
        // own): wait for it before looking.
        let after = settle(&layer, &before, 1).await;
        assert_eq!(after.fenced_out - before.fenced_out, 1, "{name}");
        let (_, body, cache_status) = send(&app, Method::GET, "/item", true).await;
        assert_eq!(body, "v1", "{name}: {cache_status}");
    }
}

/// A relief leader (a waiter whose wait ran out, leading the same flight a
/// second time) rebuilds under a permit: a write during its origin call
/// keeps its older body out of the store, as the first leader's lease
/// keeps its own out, and reads after the write get the write's version.
/// 20 rounds on each store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relief_leader_is_fenced_by_its_permit() {
    for (name, builder, _redis) in stores().await {
        let origin = Versioned::default();
        let layer = builder
            .wait_timeout(Duration::from_millis(50))
            .build()
            .unwrap();
        let app = origin.router().layer(layer.clone());
        for round in 0..20 {
            send(&app, Method::POST, "/item", false).await;
            let before = layer.stats();
            let gets = origin.gets();
            // The leader stalls inside the origin; the waiter's wait runs
            // out and it leads the same flight again: it stalls there too.
            origin.gated.store(true, Ordering::SeqCst);
            let leader = spawn_get(&app);
            origin.entered("the leader rebuilds").await;
            let relief = spawn_get(&app);
            origin
                .entered("a waiter whose wait ran out relieves the leader")
                .await;
            origin.gated.store(false, Ordering::SeqCst);
            let stats = layer.stats();
            assert_eq!(stats.wait_timeouts - before.wait_timeouts, 1, "{name}");
            // The write completes meanwhile.
            let (status, _, _) = send(&app, Method::POST, "/item", false).await;
            assert_eq!(status, StatusCode::NO_CONTENT);
            let after_write = origin.current();
            let (_, body, cache_status) = send(&app, Method::GET, "/item", false).await;
            assert_eq!(body, after_write, "{name} round {round}: {cache_status}");
            // Both stalled rebuilds answer now, with what they read before
            // the write; their fills come after the new entry's.
            origin.release(2);
            for early in [leader, relief] {
                let (status, _, cache_status) = early.await.unwrap();
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "{name} round {round}: {cache_status}"
                );
            }
            // Nothing older was stored.
            let (_, body, cache_status) = send(&app, Method::GET, "/item", false).await;
            assert_eq!(body, after_write, "{name} round {round}: {cache_status}");
            assert!(
                cache_status.contains("hit"),
                "{name} round {round}: {cache_status}"
            );
            let after = layer.stats();
            assert_eq!(
                after.fenced_out - before.fenced_out,
                2,
                "{name} round {round}: both fills from before the write are fenced out"
            );
            assert_eq!(
                origin.gets() - gets,
                3,
                "{name} round {round}: the leader, the relief leader, the read after the write"
            );
        }
    }
}

/// Requests for a key whose last answer could not be shared (hit-for-miss)
/// go to the origin alone, not queued behind each other, each under a
/// permit: a write during their origin calls keeps their older bodies out
/// of the store, and reads after the write get the write's version. 20
/// rounds on each store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_for_miss_rebuilds_are_fenced_by_their_permits() {
    for (name, builder, _redis) in stores().await {
        let origin = Versioned::default();
        let layer = builder.build().unwrap();
        let app = origin.router().layer(layer.clone());
        for round in 0..20 {
            send(&app, Method::POST, "/item", false).await;
            // The origin's answer may not be shared: the key is marked.
            origin.private.store(true, Ordering::SeqCst);
            let (_, _, cache_status) = send(&app, Method::GET, "/item", false).await;
            assert!(cache_status.contains("detail=private"), "{cache_status}");
            origin.private.store(false, Ordering::SeqCst);
            let before = layer.stats();
            let gets = origin.gets();
            // Two reads of the marked key both go to the origin, and stall.
            origin.gated.store(true, Ordering::SeqCst);
            let first = spawn_get(&app);
            let second = spawn_get(&app);
            origin.entered("a read of a hit-for-miss key").await;
            origin
                .entered("reads of a hit-for-miss key do not wait for each other")
                .await;
            origin.gated.store(false, Ordering::SeqCst);
            // The write completes meanwhile.
            let (status, _, _) = send(&app, Method::POST, "/item", false).await;
            assert_eq!(status, StatusCode::NO_CONTENT);
            let after_write = origin.current();
            let (_, body, cache_status) = send(&app, Method::GET, "/item", false).await;
            assert_eq!(body, after_write, "{name} round {round}: {cache_status}");
            // Its fill runs behind its response: wait for it, so that the
            // stalled reads' fills come after it.
            let stats = settle(&layer, &before, 1).await;
            origin.release(2);
            for early in [first, second] {
                let (status, _, cache_status) = early.await.unwrap();
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "{name} round {round}: {cache_status}"
                );
            }
            let after = settle(&layer, &stats, 2).await;
            // Nothing older was stored.
            let (_, body, cache_status) = send(&app, Method::GET, "/item", false).await;
            assert_eq!(body, after_write, "{name} round {round}: {cache_status}");
            assert!(
                cache_status.contains("hit"),
                "{name} round {round}: {cache_status}"
            );
            assert_eq!(
                after.fenced_out - before.fenced_out,
                2,
                "{name} round {round}: both fills from before the write are fenced out"
            );
            assert_eq!(
                origin.gets() - gets,
                3,
                "{name} round {round}: two stalled reads, the read after the write"
            );
        }
    }
}

/// A leader that did not get the key's lease -- another process held it
/// past the wait (then it rebuilds under a permit), the store failed while
/// it waited (a permit too), or the lease call failed at once (it stores
/// nothing) -- never stores what it read before a write that completed
/// during its origin call, and reads after the write get the write's
/// version. 20 rounds of each on each store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_the_lease_never_stores_over_a_write() {
    for (name, builder, store, _redis) in refusing_stores().await {
        let origin = Versioned::default();
        let layer = builder
            .wait_timeout(Duration::from_millis(50))
            .build()
            .unwrap();
        let key = layer.cache_key(&Request::get("/item").body(()).unwrap());
        let app = origin.router().layer(layer.clone());
        for refusal in [Refusal::Held, Refusal::HeldThenFailing, Refusal::Failing] {
            let permit = refusal != Refusal::Failing;
            for round in 0..20 {
                let what = format!("{name} {refusal:?} round {round}");
                send(&app, Method::POST, "/item", false).await;
                let before = layer.stats();
                let gets = origin.gets();
                // The leader is refused the lease; it rebuilds all the same
                // and stalls inside the origin. Then the other process is
                // gone: the lease is free for the reads after the write.
                store.arm(&key, refusal);
                origin.gated.store(true, Ordering::SeqCst);
                let early = spawn_get(&app);
                origin.entered("a leader without the lease rebuilds").await;
                store.disarm();
                origin.gated.store(false, Ordering::SeqCst);
                let stats = layer.stats();
                let waited = (
                    stats.remote_waits - before.remote_waits,
                    stats.wait_timeouts - before.wait_timeouts,
                );
                let want = if permit { (1, 1) } else { (0, 0) };
                assert_eq!(waited, want, "{what}: remote waits, wait timeouts");
                let failed = stats.store_errors > before.store_errors;
                assert_eq!(
                    failed,
                    refusal != Refusal::Held,
                    "{what}: failed lease calls"
                );
                // The write completes meanwhile.
                let (status, _, _) = send(&app, Method::POST, "/item", false).await;
                assert_eq!(status, StatusCode::NO_CONTENT);
                let after_write = origin.current();
                let (_, body, cache_status) = send(&app, Method::GET, "/item", false).await;
                assert_eq!(body, after_write, "{what}: {cache_status}");
                // The stalled rebuild answers now, with what it read before
                // the write; its fill comes after the new entry's.
                origin.release(1);
                let (status, _, cache_status) = early.await.unwrap();
                assert_eq!(status, StatusCode::OK, "{what}: {cache_status}");
                // Nothing older was stored.
                let (_, body, cache_status) = send(&app, Method::GET, "/item", false).await;
                assert_eq!(body, after_write, "{what}: {cache_status}");
                assert!(cache_status.contains("hit"), "{what}: {cache_status}");
                let after = layer.stats();
                assert_eq!(
                    (
                        after.stores - before.stores,
                        after.fenced_out - before.fenced_out
                    ),
                    (1, u64::from(permit)),
                    "{what}: stores, fills fenced out"
                );
                assert_eq!(
                    origin.gets() - gets,
                    2,
                    "{what}: the stalled rebuild, the read after the write"
                );
            }
        }
    }
}

/// The inner service fails: the flight's waiters get a `502` instead of
/// calling it again one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_error_is_shared_with_the_waiters() {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let svc = service_fn({
        let (calls, gate, entered) = (calls.clone(), gate.clone(), entered.clone());
        move |_req: Request<Body>| {
            let (calls, gate, entered) = (calls.clone(), gate.clone(), entered.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                entered.notify_one();
                gate.notified().await;
                Err::<http::Response<Body>, &'static str>("origin down")
            }
        }
    });
    let layer = FenceLayer::memory();
    let svc = tower::ServiceBuilder::new().layer(layer).service(svc);
    let first = tokio::spawn(
        svc.clone()
            .oneshot(Request::get("/x").body(Body::empty()).unwrap()),
    );
    entered.notified().await;
    let waiters: Vec<_> = (0..199)
        .map(|_| {
            tokio::spawn(
                svc.clone()
                    .oneshot(Request::get("/x").body(Body::empty()).unwrap()),
            )
        })
        .collect();
    // Let every waiter join the flight, then let the origin fail.
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.notify_waiters();
    assert!(
        first.await.unwrap().is_err(),
        "the leader's client gets the error itself"
    );
    let mut bad_gateway = 0;
    for waiter in waiters {
        // A waiter that arrived after the flight ended leads the next one;
        // with the gate open it fails on its own (an `Err`).
        if let Ok(response) = waiter.await.unwrap() {
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
            bad_gateway += 1;
        }
    }
    let calls = calls.load(Ordering::SeqCst);
    assert!(calls <= 3, "{calls} inner calls for 200 requests");
    assert!(bad_gateway >= 190, "{bad_gateway} waiters shared the error");
}

/// An origin slower than `wait_timeout`: when the wait runs out, one
/// waiter becomes a second leader of the same flight and the others wait
/// for whichever leader answers first, so 200 requests cost about origin
/// time / wait timeout calls, not 200.
#[tokio::test(start_paused = true)]
async fn a_wait_that_runs_out_does_not_stampede() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service_fn({
        let calls = calls.clone();
        move |_req: Request<Body>| {
            let calls = calls.clone();
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, Infallible>(http::Response::new(Body::from(format!("call {n}"))))
            }
        }
    });
    let layer = FenceLayer::builder()
        .wait_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new().layer(layer).service(svc);
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let request = Request::get("/slow").body(Body::empty()).unwrap();
            tokio::spawn(svc.clone().oneshot(request))
        })
        .collect();
    for request in requests {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"call "));
    }
    // Leaders start at 0, 300, 600 and 900 ms; the first answers at 1 s.
    let calls = calls.load(Ordering::SeqCst);
    assert!(calls <= 4, "{calls} origin calls for 200 requests");
}

/// The leader streams: its client gets the head and the first bytes when
/// the origin sends them, not when the whole body is there; a
/// `text/event-stream` response is never held back nor recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_streams_to_its_client() {
    let gate = Arc::new(Notify::new());
    let svc = service_fn({
        let gate = gate.clone();
        move |req: Request<Body>| {
            let gate = gate.clone();
            async move {
                let sse = req.uri().path() == "/events";
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(4);
                tokio::spawn(async move {
                    let _ = tx.send(Ok(Bytes::from_static(b"first "))).await;
                    gate.notified().await;
                    let _ = tx.send(Ok(Bytes::from_static(b"second"))).await;
                });
                let body = Body::from_stream(tokio_stream(rx));
                let mut response = http::Response::new(body);
                if sse {
                    response
                        .headers_mut()
                        .insert("content-type", "text/event-stream".parse().unwrap());
                    response
                        .headers_mut()
                        .insert("cache-control", "no-cache".parse().unwrap());
                }
                Ok::<_, Infallible>(response)
            }
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(FenceLayer::memory())
        .service(svc);
    for path in ["/slow-body", "/events"] {
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            svc.clone()
                .oneshot(Request::get(path).body(Body::empty()).unwrap()),
        )
        .await
        .expect("the head arrives before the body ends")
        .unwrap();
        let mut body = response.into_body();
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the first bytes arrive when the origin sends them")
            .unwrap()
            .unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"first "));
        // `notify_one` keeps the permit if the origin's task has not come
        // to its wait yet (`notify_waiters` would be lost then, and the
        // body would never end).
        gate.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, Bytes::from_static(b"second"));
    }
}

/// A `tokio::sync::mpsc::Receiver` as a `Stream` (no extra crate).
fn tokio_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core_stream::Stream<Item = T> {
    futures_core_stream::from_receiver(rx)
}

#[allow(unreachable_pub)]
mod futures_core_stream {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub use futures_util::Stream;

    pub struct FromReceiver<T>(tokio::sync::mpsc::Receiver<T>);

    impl<T> Stream for FromReceiver<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }

    pub fn from_receiver<T>(rx: tokio::sync::mpsc::Receiver<T>) -> FromReceiver<T> {
        FromReceiver(rx)
    }
}

/// A `GET` that declares a body is passed: it leads no flight, so a body
/// that never arrives stalls nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_body_is_passed() {
    let origin = Versioned::default();
    let app = origin.router().layer(FenceLayer::memory());
    let request = Request::get("/item")
        .header("content-length", "5")
        .body(Body::from("hello"))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let cache_status = response.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cache_status.contains("detail=request-body"),
        "{cache_status}"
    );
    // Nothing was stored by it: the next plain GET is a miss.
    let (_, _, cache_status) = send(&app, Method::GET, "/item", false).await;
    assert!(cache_status.contains("fwd=uri-miss"), "{cache_status}");
    assert_eq!(origin.gets.load(Ordering::SeqCst), 2);
}

/// A target without an absolute path (authority-form) is passed: no
/// invalidation could ever select its key.
#[tokio::test]
async fn a_target_without_a_path_is_passed() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service_fn({
        let calls = calls.clone();
        move |_req: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                let mut response = http::Response::new(Body::from("x"));
                response
                    .headers_mut()
                    .insert("cache-control", "max-age=60".parse().unwrap());
                Ok::<_, Infallible>(response)
            }
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(FenceLayer::memory())
        .service(svc);
    for _ in 0..2 {
        let request = Request::get("example.com:80").body(Body::empty()).unwrap();
        assert_eq!(request.uri().path(), "");
        let response = svc.clone().oneshot(request).await.unwrap();
        let cache_status = response.headers()["cache-status"].to_str().unwrap();
        assert!(cache_status.contains("detail=target"), "{cache_status}");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "never served from the cache"
    );
}

/// A rebuild whose origin hangs holds its lease for `rebuild_timeout`, not
/// for ever: then the lease is no longer extended and expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_rebuild_lets_its_lease_go() {
    let svc = service_fn(|_req: Request<Body>| async {
        std::future::pending::<()>().await;
        Ok::<_, Infallible>(http::Response::new(Body::empty()))
    });
    let layer = FenceLayer::builder()
        .lease_ttl(Duration::from_millis(150))
        .rebuild_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let key = layer.cache_key(&Request::get("/hang").body(()).unwrap());
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(svc);
    let hanging = tokio::spawn(svc.oneshot(Request::get("/hang").body(Body::empty()).unwrap()));
    let store = layer.store().clone();
    // While the rebuild runs its lease is held...
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!store
        .try_lease(&key, "another", Duration::from_secs(1), &[])
        .await
        .unwrap());
    // ...and some time after the rebuild timeout it is free.
    let mut free = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if store
            .try_lease(&key, "another", Duration::from_secs(1), &[])
            .await
            .unwrap()
        {
            free = true;
            break;
        }
    }
    assert!(free, "the lease outlived the rebuild timeout");
    hanging.abort();
}

/// TTL and grace on paused time: with `Clock::tokio`, `advance` ages
/// entries, so these tests wait for nothing.
#[tokio::test(start_paused = true)]
async fn ttl_and_grace_run_on_paused_time() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service_fn({
        let calls = calls.clone();
        move |_req: Request<Body>| {
            let calls = calls.clone();
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let response = http::Response::builder()
                    .header("cache-control", "max-age=60, stale-while-revalidate=30")
                    .body(Body::from(format!("v{n}")))
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        }
    });
    let layer = FenceLayer::builder()
        .clock(tower_fence::Clock::tokio())
        .xfetch_beta(0.0)
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new().layer(layer).service(svc);
    let get = || async {
        let response = svc
            .clone()
            .oneshot(Request::get("/t").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.headers()["cache-status"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (String::from_utf8_lossy(&body).into_owned(), status)
    };
    assert_eq!(get().await.0, "v0");
    tokio::time::advance(Duration::from_secs(59)).await;
    let (body, status) = get().await;
    assert_eq!(
        (body.as_str(), status.contains("hit")),
        ("v0", true),
        "{status}"
    );
    // Stale, within grace: served stale while one refresh runs behind.
    tokio::time::advance(Duration::from_secs(10)).await;
    let (body, status) = get().await;
    assert_eq!(body, "v0");
    assert!(status.contains("stale-while-revalidate"), "{status}");
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let (body, status) = get().await;
    assert_eq!(body, "v1", "{status}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Past freshness and grace: a miss.
    tokio::time::advance(Duration::from_secs(100)).await;
    let (body, status) = get().await;
    assert_eq!(body, "v2");
    assert!(
        status.contains("fwd=stale") || status.contains("fwd=uri-miss"),
        "{status}"
    );
}
