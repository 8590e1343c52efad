//! Writes invalidate what they touch: prefixes, Location, tags, the race
//! with a rebuild, background mode, and never `KEYS`. Every behaviour test
//! runs on the memory store and on Redis, with both prefix strategies.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::routing::any;
use axum::Router;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::RedisProcess;
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_fence::invalidate::{InvalidationMode, PrefixStrategy};
use tower_fence::policy::rules::Rule;
use tower_fence::store::{
    Fill, FillSubscription, KeyPattern, MemoryStore, RedisStore, Store, StoreFuture,
};
use tower_fence::{FenceLayer, FenceLayerBuilder};

struct Backend {
    redis: Option<RedisProcess>,
    strategy: PrefixStrategy,
}

impl Backend {
    fn memory(strategy: PrefixStrategy) -> Self {
        Backend {
            redis: None,
            strategy,
        }
    }

    async fn redis(strategy: PrefixStrategy) -> Self {
        Backend {
            redis: Some(RedisProcess::start_async().await),
            strategy,
        }
    }

    async fn builder(&self) -> FenceLayerBuilder {
        let store = self.store().await;
        self.builder_on(store)
    }

    /// A fresh store of this backend.
    async fn store(&self) -> Arc<dyn Store> {
        match &self.redis {
            None => Arc::new(MemoryStore::default()),
            Some(redis) => Arc::new(RedisStore::new(redis.pool().await)),
        }
    }

    /// A builder on `store` (this backend's, maybe wrapped).
    fn builder_on(&self, store: impl Store) -> FenceLayerBuilder {
        let builder = FenceLayer::builder()
            .store(store)
            .prefix_strategy(self.strategy);
        match &self.redis {
            None => builder,
            Some(_) => builder.store_timeout(Duration::from_secs(2)),
        }
    }
}

/// A store whose bulk deletions (what invalidations call) wait at a gate
/// until it is opened; everything else goes straight to `inner`.
#[derive(Debug, Clone)]
struct Gated {
    inner: Arc<dyn Store>,
    gate: Arc<Gate>,
}

#[derive(Debug)]
struct Gate {
    open: tokio::sync::watch::Sender<bool>,
    entered: AtomicUsize,
}

impl Gate {
    fn closed() -> Arc<Self> {
        Arc::new(Gate {
            open: tokio::sync::watch::channel(false).0,
            entered: AtomicUsize::new(0),
        })
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    /// How many bulk deletions reached the gate so far.
    fn entered(&self) -> usize {
        self.entered.load(Ordering::SeqCst)
    }

    async fn pass(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

impl Store for Gated {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<bytes::Bytes>> {
        self.inner.get(key)
    }

    fn put<'a>(&'a self, key: &'a str, record: bytes::Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
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
        self.inner.try_lease(key, token, ttl, sets)
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

    fn fill<'a>(&'a self, fill: Fill<'a>) -> StoreFuture<'a, bool> {
        self.inner.fill(fill)
    }

    fn subscribe_fill(&self, key: &str) -> Option<FillSubscription> {
        self.inner.subscribe_fill(key)
    }

    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            self.gate.pass().await;
            self.inner.delete_matching(pattern).await
        })
    }

    fn delete_members<'a>(&'a self, set: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            self.gate.pass().await;
            self.inner.delete_members(set).await
        })
    }

    fn delete_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            self.gate.pass().await;
            self.inner.delete_members_matching(set, pattern).await
        })
    }
}

/// An origin: `GET` answers `max-age=60` with a body naming the path and
/// the call, tagged by `?tags=`, varying on the header `?vary=` names (its
/// value joins the body); `/race/..` waits for the gate first.
/// Other methods answer `?status=` (204 by default), with `?location=` and
/// `?clocation=` as `Location` and `Content-Location`.
#[derive(Clone, Default)]
struct Origin {
    gets: Arc<AtomicUsize>,
    gate: Arc<Notify>,
    gate_entered: Arc<AtomicUsize>,
}

impl Origin {
    fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    fn router(&self) -> Router {
        async fn handler(
            State(origin): State<Origin>,
            method: Method,
            headers: HeaderMap,
            uri: http::Uri,
            RawQuery(query): RawQuery,
        ) -> http::Response<Body> {
            let path = uri.path();
            let query = query.unwrap_or_default();
            let param = |name: &str| {
                query.split('&').find_map(|pair| {
                    let (n, v) = pair.split_once('=')?;
                    (n == name).then(|| v.replace("%20", " ").replace("%2F", "/"))
                })
            };
            let mut response = http::Response::builder();
            if method == Method::GET {
                if path.starts_with("/race/") {
                    let opened = origin.gate.notified();
                    origin.gate_entered.fetch_add(1, Ordering::SeqCst);
                    opened.await;
                }
                let n = origin.gets.fetch_add(1, Ordering::SeqCst) + 1;
                response = response.header("cache-control", "max-age=60");
                if let Some(tags) = param("tags") {
                    response = response.header("surrogate-key", tags);
                }
                let mut body = format!("{path} call {n}");
                if let Some(name) = param("vary") {
                    let value = headers.get(&name).map_or("", |v| v.to_str().unwrap());
                    body.push_str(&format!(" [{value}]"));
                    response = response.header("vary", name);
                }
                return response.body(Body::from(body)).unwrap();
            }
            let status = param("status").map_or(204, |s| s.parse().unwrap());
            if let Some(location) = param("location") {
                response = response.header("location", location);
            }
            if let Some(location) = param("clocation") {
                response = response.header("content-location", location);
            }
            response.status(status).body(Body::empty()).unwrap()
        }
        Router::new()
            .route("/", any(handler))
            .route("/{*path}", any(handler))
            .with_state(self.clone())
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn is_hit(&self) -> bool {
        self.headers
            .get("cache-status")
            .is_some_and(|v| v.to_str().unwrap().starts_with("tower-fence; hit"))
    }
}

async fn send(app: &Router, method: Method, uri: &str) -> Reply {
    send_with(app, method, uri, &[]).await
}

async fn send_with(app: &Router, method: Method, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "shop.example");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Body::empty()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), app.clone().oneshot(request))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Method::GET, uri).await
}

/// Fills each of `uris` and checks the second read is a hit.
async fn warm(app: &Router, uris: &[&str]) {
    for uri in uris {
        get(app, uri).await;
        assert!(get(app, uri).await.is_hit(), "{uri} is cached");
    }
}

/// Waits (boundedly) until each of `uris` has been invalidated: a read that
/// is not a hit. A still-cached entry keeps answering hits, so the first
/// miss is the invalidation (the entries live 60 s).
async fn eventually_invalidated(app: &Router, uris: &[&str]) {
    for uri in uris {
        let mut invalidated = false;
        for _ in 0..500 {
            if !get(app, uri).await.is_hit() {
                invalidated = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(invalidated, "{uri} was invalidated within 10 s");
    }
}

macro_rules! everywhere {
    ($($name:ident),* $(,)?) => {
        mod memory_scan {
            $( #[tokio::test] async fn $name() {
                super::$name(super::Backend::memory(super::PrefixStrategy::Scan)).await;
            } )*
        }
        mod memory_index {
            $( #[tokio::test] async fn $name() {
                super::$name(super::Backend::memory(super::PrefixStrategy::Index)).await;
            } )*
        }
        mod redis_scan {
            $( #[tokio::test] async fn $name() {
                super::$name(super::Backend::redis(super::PrefixStrategy::Scan).await).await;
            } )*
        }
        mod redis_index {
            $( #[tokio::test] async fn $name() {
                super::$name(super::Backend::redis(super::PrefixStrategy::Index).await).await;
            } )*
        }
    };
}

everywhere!(
    a_write_clears_its_path_and_below_only,
    adversarial_paths_cannot_widen_an_invalidation,
    location_and_content_location_are_invalidated,
    failed_writes_invalidate_nothing,
    tags_invalidate_their_entries,
    forwarded_tags_reach_the_client_and_still_index,
    the_invalidator_clears_prefixes_and_requests,
    a_rebuild_that_started_before_a_write_is_not_stored,
    location_and_content_location_are_invalidated_exactly,
    a_rebuild_at_a_location_is_not_stored,
    a_write_to_the_root_invalidates_the_root_only,
    the_root_prefix_is_invalidated_on_opt_in,
    writes_to_long_paths_invalidate_their_entries,
    invalidating_a_request_removes_every_variant,
    one_time_budget_for_all_targets_of_a_write,
    a_write_dropped_mid_invalidation_still_invalidates,
);

async fn a_write_clears_its_path_and_below_only(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    let cleared = [
        "/users/42",
        "/users/42?x=1",
        "/users/42/posts",
        "/users/42/",
    ];
    let kept = ["/users/420", "/users", "/users/4", "/other/42"];
    warm(&app, &cleared).await;
    warm(&app, &kept).await;
    let write = send(&app, Method::PUT, "/users/42").await;
    assert_eq!(write.status, StatusCode::NO_CONTENT);
    for uri in cleared {
        assert!(!get(&app, uri).await.is_hit(), "{uri} was invalidated");
    }
    for uri in kept {
        assert!(get(&app, uri).await.is_hit(), "{uri} was kept");
    }
    // Unknown methods are writes too (RFC 9111 §4.4).
    let purge = Method::from_bytes(b"PURGE").unwrap();
    send(&app, purge, "/users/420").await;
    assert!(!get(&app, "/users/420").await.is_hit());
}

async fn adversarial_paths_cannot_widen_an_invalidation(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    let kept = ["/files/ab", "/files/a", "/files/b", "/files/x/y"];
    warm(&app, &kept).await;
    warm(&app, &["/files/a*", "/files/[ab]"]).await;
    // (`/files/?` would be the path `/files/` with a query: all of /files.)
    for uri in [
        "/files/a*",
        "/files/%2A",
        "/files/[ab]",
        "/files/%3F",
        "/files/%5C",
    ] {
        send(&app, Method::DELETE, uri).await;
    }
    for uri in kept {
        assert!(
            get(&app, uri).await.is_hit(),
            "{uri} survives glob characters"
        );
    }
    assert!(!get(&app, "/files/a*").await.is_hit());
    assert!(!get(&app, "/files/[ab]").await.is_hit());
}

async fn location_and_content_location_are_invalidated(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    warm(&app, &["/users/42", "/teams/7", "/elsewhere/1"]).await;
    let created = send(
        &app,
        Method::POST,
        "/users?status=201&location=/users/42&clocation=http://shop.example/teams/7",
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert!(!get(&app, "/users/42").await.is_hit());
    assert!(!get(&app, "/teams/7").await.is_hit());
    // Another origin's Location is not ours to invalidate.
    send(
        &app,
        Method::POST,
        "/users?status=201&location=http://evil.example/elsewhere/1",
    )
    .await;
    assert!(get(&app, "/elsewhere/1").await.is_hit());
}

async fn location_and_content_location_are_invalidated_exactly(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    let home = ["/", "/?page=2"];
    let user = ["/users/42", "/users/42?x=1"];
    let kept = [
        "/about",
        "/users",
        "/users/42/posts",
        "/users/420",
        "/teams/7/members",
    ];
    warm(&app, &home).await;
    warm(&app, &user).await;
    warm(&app, &kept).await;
    warm(&app, &["/teams/7"]).await;
    let varying = "/users/42?vary=accept-language";
    let mut before = Vec::new();
    for language in ["en", "de"] {
        let lang = [("accept-language", language)];
        before.push(send_with(&app, Method::GET, varying, &lang).await.body);
        let again = send_with(&app, Method::GET, varying, &lang).await;
        assert!(again.is_hit(), "the {language} variant is cached");
    }

    // A login form sends the browser home: `/` itself, nothing under it.
    let login = send(&app, Method::POST, "/login?status=303&location=/").await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    for uri in home {
        assert!(!get(&app, uri).await.is_hit(), "{uri} was invalidated");
    }
    for uri in kept.iter().chain(&user) {
        assert!(
            get(&app, uri).await.is_hit(),
            "{uri} survives `Location: /`"
        );
    }

    // A create names the new resource: that URI with any query and any
    // variant, nothing under it or beside it.
    let created = send(
        &app,
        Method::POST,
        "/signup?status=201&location=/users/42&clocation=http://shop.example/teams/7",
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    for uri in user.iter().chain(&["/teams/7"]) {
        assert!(!get(&app, uri).await.is_hit(), "{uri} was invalidated");
    }
    for (language, old) in ["en", "de"].into_iter().zip(before) {
        let lang = [("accept-language", language)];
        let reply = send_with(&app, Method::GET, varying, &lang).await;
        assert!(!reply.is_hit(), "the {language} variant was invalidated");
        assert_ne!(reply.body, old, "the {language} variant was rebuilt");
    }
    for uri in kept {
        assert!(get(&app, uri).await.is_hit(), "{uri} was kept");
    }
}

async fn a_rebuild_at_a_location_is_not_stored(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    let reader = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/race/7").await }
    });
    while origin.gate_entered.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A write elsewhere names the path being rebuilt: its lease goes.
    let write = send(&app, Method::POST, "/new?status=201&location=/race/7").await;
    assert_eq!(write.status, StatusCode::CREATED);
    origin.gate.notify_waiters();
    let stale = reader.await.unwrap();
    assert_eq!(stale.body, "/race/7 call 1");
    assert_eq!(layer.stats().fenced_out, 1);
    let next = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/race/7").await }
    });
    while origin.gate_entered.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    origin.gate.notify_waiters();
    let fresh = next.await.unwrap();
    assert!(!fresh.is_hit());
    assert_eq!(fresh.body, "/race/7 call 2");
}

async fn a_write_to_the_root_invalidates_the_root_only(backend: Backend) {
    let origin = Origin::default();
    let layer = backend
        .builder()
        .await
        .rule(Rule::path("/flush").invalidate(["/"]))
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    let root = ["/", "/?q=1"];
    let below = ["/a", "/a/b", "/flush"];
    warm(&app, &root).await;
    warm(&app, &below).await;
    let purge = Method::from_bytes(b"PURGE").unwrap();
    for method in [Method::PUT, Method::POST, Method::DELETE, purge] {
        let write = send(&app, method.clone(), "/").await;
        assert_eq!(write.status, StatusCode::NO_CONTENT);
        for uri in root {
            assert!(!get(&app, uri).await.is_hit(), "{method} / clears {uri}");
        }
        for uri in below {
            assert!(get(&app, uri).await.is_hit(), "{method} / keeps {uri}");
        }
        warm(&app, &root).await;
    }
    // Explicit calls do what they say: an invalidator's prefix `/` ...
    layer.invalidator().invalidate_prefix("/").await.unwrap();
    for uri in root.iter().chain(&below) {
        assert!(!get(&app, uri).await.is_hit(), "invalidator clears {uri}");
    }
    // ... and a rule's.
    warm(&app, &["/a", "/a/b"]).await;
    send(&app, Method::POST, "/flush").await;
    for uri in ["/", "/a", "/a/b"] {
        assert!(!get(&app, uri).await.is_hit(), "the rule clears {uri}");
    }
}

async fn the_root_prefix_is_invalidated_on_opt_in(backend: Backend) {
    let origin = Origin::default();
    let layer = backend
        .builder()
        .await
        .invalidate_root_prefix(true)
        .build()
        .unwrap();
    let app = origin.router().layer(layer);
    let all = ["/", "/?q=1", "/a", "/a/b"];
    warm(&app, &all).await;
    send(&app, Method::PUT, "/").await;
    for uri in all {
        assert!(!get(&app, uri).await.is_hit(), "{uri} was invalidated");
    }
}

/// A long path, shortened for a message.
fn short(uri: &str) -> String {
    match uri.get(..24) {
        Some(start) if uri.len() > 40 => format!("{start}…({} bytes)", uri.len()),
        _ => uri.to_owned(),
    }
}

async fn writes_to_long_paths_invalidate_their_entries(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    // Past the readable length of a key (512 bytes escaped): cut.
    let long = format!("/long/{}", "a".repeat(600));
    let long_query = format!("{long}?x=1");
    let long_child = format!("{long}/child");
    // Exactly 512 bytes: the path is whole, its children are cut right
    // after it.
    let edge = format!("/edge/{}bb", "*".repeat(168));
    assert_eq!(edge.len() + 2 * 168, 512, "each `*` is escaped as `%2A`");
    let edge_child = format!("{edge}/c");
    let kept = ["/long/b", "/long", "/edge"];
    warm(&app, &[&long, &long_query, &long_child, &edge, &edge_child]).await;
    warm(&app, &kept).await;
    send(&app, Method::PUT, &long).await;
    for uri in [&long, &long_query, &long_child] {
        assert!(
            !get(&app, uri).await.is_hit(),
            "{} was invalidated",
            short(uri)
        );
    }
    send(&app, Method::DELETE, &edge).await;
    for uri in [&edge, &edge_child] {
        assert!(
            !get(&app, uri).await.is_hit(),
            "{} was invalidated",
            short(uri)
        );
    }
    for uri in kept {
        assert!(get(&app, uri).await.is_hit(), "{uri} was kept");
    }
    // A long `Location`, exactly.
    warm(&app, &[&long, &long_query]).await;
    let created = send(
        &app,
        Method::POST,
        &format!("/new?status=201&location={long}"),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    for uri in [&long, &long_query] {
        assert!(
            !get(&app, uri).await.is_hit(),
            "{} was invalidated",
            short(uri)
        );
    }
}

async fn invalidating_a_request_removes_every_variant(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    let uri = "/menu/1?vary=accept-language";
    let mut before = Vec::new();
    for language in ["en", "de", "fr"] {
        let lang = [("accept-language", language)];
        before.push(send_with(&app, Method::GET, uri, &lang).await.body);
        assert!(send_with(&app, Method::GET, uri, &lang).await.is_hit());
    }
    warm(&app, &["/menu/1", "/menu/1?vary=x-other"]).await;
    let request = Request::get(uri)
        .header("host", "shop.example")
        .header("accept-language", "en")
        .body(())
        .unwrap();
    let removed = layer
        .invalidator()
        .invalidate_request(&request)
        .await
        .unwrap();
    assert!(removed >= 4, "the stub and three variants: {removed}");
    // Every language is rebuilt, not only the one the request named.
    for (language, old) in ["en", "de", "fr"].into_iter().zip(before) {
        let lang = [("accept-language", language)];
        let reply = send_with(&app, Method::GET, uri, &lang).await;
        assert!(!reply.is_hit(), "{language} was invalidated");
        assert_ne!(reply.body, old);
        assert!(
            reply.body.ends_with(&format!("[{language}]")),
            "{}",
            reply.body
        );
    }
    // Other queries of the path are other requests.
    assert!(get(&app, "/menu/1").await.is_hit());
    assert!(get(&app, "/menu/1?vary=x-other").await.is_hit());
}

async fn one_time_budget_for_all_targets_of_a_write(backend: Backend) {
    let origin = Origin::default();
    let gate = Gate::closed();
    let store = Gated {
        inner: backend.store().await,
        gate: gate.clone(),
    };
    let budget = Duration::from_secs(5);
    let layer = backend
        .builder_on(store)
        .invalidation_timeout(budget)
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    let touched = ["/a/1", "/b/2", "/c/3"];
    warm(&app, &touched).await;
    // The store hangs; the clock only moves when everything waits.
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    let write = send(
        &app,
        Method::POST,
        "/a/1?status=201&location=/b/2&clocation=/c/3",
    )
    .await;
    let took = started.elapsed();
    tokio::time::resume();
    assert_eq!(write.status, StatusCode::CREATED);
    assert!(gate.entered() >= 1);
    assert!(
        took < budget * 2,
        "three targets share one budget of {budget:?}, the write took {took:?}"
    );
    // What did not finish went to the background queue.
    gate.open();
    eventually_invalidated(&app, &touched).await;
    assert!(layer.invalidator().dead_letters().is_empty());
}

async fn a_write_dropped_mid_invalidation_still_invalidates(backend: Backend) {
    let origin = Origin::default();
    let gate = Gate::closed();
    let store = Gated {
        inner: backend.store().await,
        gate: gate.clone(),
    };
    let layer = backend.builder_on(store).build().unwrap();
    let app = origin.router().layer(layer.clone());
    let touched = ["/carts/1", "/carts/1/items", "/orders/9"];
    warm(&app, &touched).await;
    warm(&app, &["/orders/9/lines"]).await;
    {
        // The client hangs up (or an outer timeout fires) while the write
        // invalidates: its future is dropped.
        let write = send(&app, Method::POST, "/carts/1?status=201&location=/orders/9");
        tokio::pin!(write);
        loop {
            tokio::select! {
                reply = &mut write => panic!("the write did not wait for the store: {reply:?}"),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            if gate.entered() >= 1 {
                break;
            }
        }
    }
    gate.open();
    eventually_invalidated(&app, &touched).await;
    assert!(get(&app, "/orders/9/lines").await.is_hit());
    assert!(layer.invalidator().dead_letters().is_empty());
}

async fn failed_writes_invalidate_nothing(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    warm(&app, &["/orders/1"]).await;
    for status in [400, 404, 409, 500, 503] {
        let reply = send(&app, Method::PATCH, &format!("/orders/1?status={status}")).await;
        assert_eq!(reply.status.as_u16(), status);
    }
    assert!(get(&app, "/orders/1").await.is_hit());
    assert_eq!(layer.stats().invalidations, 0);
    // gRPC calls are POSTs, but not writes.
    let grpc = Request::post("/orders/1")
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(grpc).await.unwrap();
    assert!(get(&app, "/orders/1").await.is_hit());
    assert_eq!(layer.stats().invalidations, 0);
}

async fn forwarded_tags_reach_the_client_and_still_index(backend: Backend) {
    let origin = Origin::default();
    let layer = backend
        .builder()
        .await
        .forward_tag_header(true)
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    warm(&app, &["/a?tags=team-1", "/b?tags=user-7"]).await;
    // On a hit too: the header is stored with the entry.
    let reply = get(&app, "/a?tags=team-1").await;
    assert!(reply.is_hit());
    assert_eq!(
        reply
            .headers
            .get("surrogate-key")
            .map(|v| v.to_str().unwrap()),
        Some("team-1"),
        "a CDN in front sees the surrogate keys"
    );
    layer.invalidator().invalidate_tag("team-1").await.unwrap();
    assert!(!get(&app, "/a?tags=team-1").await.is_hit());
    assert!(get(&app, "/b?tags=user-7").await.is_hit());
}

async fn tags_invalidate_their_entries(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    let tagged = [
        "/a?tags=user-42%20team-1",
        "/b?tags=team-1",
        "/c?tags=user-7",
    ];
    warm(&app, &tagged).await;
    let reply = get(&app, tagged[0]).await;
    assert!(
        reply.headers.get("surrogate-key").is_none(),
        "the tag header stays inside"
    );
    let removed = layer.invalidator().invalidate_tag("team-1").await.unwrap();
    assert!(removed >= 2, "{removed}");
    assert!(!get(&app, tagged[0]).await.is_hit());
    assert!(!get(&app, tagged[1]).await.is_hit());
    assert!(get(&app, tagged[2]).await.is_hit());
}

async fn the_invalidator_clears_prefixes_and_requests(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    warm(
        &app,
        &["/reports/2026/q1", "/reports/2026/q2", "/reports/2025"],
    )
    .await;
    let invalidator = layer.invalidator();
    invalidator
        .invalidate_prefix("/reports/2026")
        .await
        .unwrap();
    assert!(!get(&app, "/reports/2026/q1").await.is_hit());
    assert!(!get(&app, "/reports/2026/q2").await.is_hit());
    assert!(get(&app, "/reports/2025").await.is_hit());
    let request = Request::get("/reports/2025")
        .header("host", "shop.example")
        .body(())
        .unwrap();
    invalidator.invalidate_request(&request).await.unwrap();
    assert!(!get(&app, "/reports/2025").await.is_hit());
}

async fn a_rebuild_that_started_before_a_write_is_not_stored(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    // A rebuild starts and stalls inside the origin, holding its lease.
    let reader = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/race/1").await }
    });
    while origin.gate_entered.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The write goes through meanwhile, and invalidates (inline).
    let write = send(&app, Method::PUT, "/race/1").await;
    assert_eq!(write.status, StatusCode::NO_CONTENT);
    // The stalled rebuild finishes with what it read before the write.
    origin.gate.notify_waiters();
    let stale = reader.await.unwrap();
    assert_eq!(stale.status, StatusCode::OK);
    assert!(!stale.headers["cache-status"]
        .to_str()
        .unwrap()
        .contains("stored"));
    assert_eq!(layer.stats().fenced_out, 1);
    // It was not stored: the next read goes to the origin.
    let next = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/race/1").await }
    });
    while origin.gate_entered.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    origin.gate.notify_waiters();
    let fresh = next.await.unwrap();
    assert!(!fresh.is_hit());
    assert_eq!(origin.gets(), 2);
}

#[tokio::test]
async fn background_mode_retries_while_redis_is_briefly_down() {
    let mut redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let layer = FenceLayer::builder()
        .redis(redis.pool().await)
        .invalidation_mode(InvalidationMode::Background)
        .invalidation_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    warm(&app, &["/items/1"]).await;
    redis.stop();
    // The write succeeds at once, whatever Redis does.
    let write = send(&app, Method::DELETE, "/items/1").await;
    assert_eq!(write.status, StatusCode::NO_CONTENT);
    // Let a few attempts fail, then bring Redis back.
    for _ in 0..100 {
        if layer.stats().invalidation_errors >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(layer.stats().invalidation_errors >= 2);
    redis.restart();
    for _ in 0..200 {
        if layer.stats().invalidations >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(layer.stats().invalidations, 1, "{:?}", layer.stats());
    assert!(layer.invalidator().dead_letters().is_empty());
}

#[tokio::test]
async fn invalidations_that_keep_failing_become_dead_letters() {
    let mut redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let layer = FenceLayer::builder()
        .redis(redis.pool().await)
        .invalidation_mode(InvalidationMode::Background)
        .invalidation_timeout(Duration::from_millis(200))
        .invalidation_attempts(2)
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    redis.stop();
    let write = send(&app, Method::POST, "/gone/1").await;
    assert_eq!(write.status, StatusCode::NO_CONTENT);
    let invalidator = layer.invalidator();
    for _ in 0..100 {
        if !invalidator.dead_letters().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = invalidator.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 2);
    assert_eq!(layer.stats().invalidations_dead, 1);
}

#[tokio::test]
async fn inline_invalidation_never_fails_a_write() {
    let mut redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let layer = FenceLayer::builder()
        .redis(redis.pool().await)
        .invalidation_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    redis.stop();
    let write = send(&app, Method::PUT, "/x/1").await;
    assert_eq!(write.status, StatusCode::NO_CONTENT);
    // The write went out within its budget; its invalidation is owed (and
    // retried in the background) rather than lost.
    assert_eq!(layer.stats().invalidations_owed, 1, "{:?}", layer.stats());
    for _ in 0..100 {
        if layer.stats().invalidation_errors >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(layer.stats().invalidation_errors >= 1);
}

/// Everything Redis is asked while `work` runs, from `MONITOR`.
async fn monitor<F: std::future::Future>(redis: &RedisProcess, work: F) -> Vec<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    stream.write_all(b"MONITOR\r\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert_eq!(ok.trim(), "+OK");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let reading = std::thread::spawn({
        let lines = lines.clone();
        move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        }
    });
    work.await;
    // A marker to know the monitor saw everything before it.
    let marker = redis.conn().await;
    let mut marker = marker;
    let _: () = bb8_redis::redis::cmd("ECHO")
        .arg("end-of-monitor")
        .query_async(&mut marker)
        .await
        .map(|_: String| ())
        .unwrap();
    for _ in 0..200 {
        if lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("end-of-monitor"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stream.shutdown(std::net::Shutdown::Both).ok();
    reading.join().unwrap();
    let seen = lines.lock().unwrap().clone();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_never_sends_keys() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let scan = FenceLayer::builder()
        .redis(redis.pool().await)
        .build()
        .unwrap();
    let index = FenceLayer::builder()
        .redis(redis.pool().await)
        .namespace("ix:")
        .prefix_strategy(PrefixStrategy::Index)
        .build()
        .unwrap();
    let apps = [
        origin.router().layer(scan.clone()),
        origin.router().layer(index.clone()),
    ];
    let commands = monitor(&redis, async {
        for app in &apps {
            warm(app, &["/k/1?tags=t", "/k/2"]).await;
            send(app, Method::DELETE, "/k").await;
        }
        scan.invalidator().invalidate_tag("t").await.unwrap();
        index.invalidator().invalidate_prefix("/").await.unwrap();
    })
    .await;
    let upper: Vec<String> = commands.iter().map(|l| l.to_uppercase()).collect();
    assert!(
        upper.iter().any(|l| l.contains("\"SCAN\"")),
        "SCAN was used"
    );
    assert!(
        upper.iter().any(|l| l.contains("\"SSCAN\"")),
        "SSCAN was used"
    );
    assert!(
        !upper.iter().any(|l| l.contains("\"KEYS\"")),
        "KEYS was sent: {commands:#?}"
    );
}

#[tokio::test]
async fn grpc_writes_cost_no_redis_command() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let layer = FenceLayer::builder()
        .redis(redis.pool().await)
        .build()
        .unwrap();
    let app = origin.router().layer(layer);
    let commands = monitor(&redis, async {
        for _ in 0..3 {
            let grpc = Request::post("/pkg.Service/Method")
                .header("content-type", "application/grpc+proto")
                .body(Body::empty())
                .unwrap();
            app.clone().oneshot(grpc).await.unwrap();
        }
    })
    .await;
    let layer_commands: Vec<&String> = commands
        .iter()
        .filter(|l| !l.contains("end-of-monitor") && !l.to_uppercase().contains("XREAD"))
        .filter(|l| !l.to_uppercase().contains("\"XREVRANGE\""))
        .collect();
    assert!(layer_commands.is_empty(), "{layer_commands:#?}");
}

#[tokio::test]
async fn index_sets_shed_members_whose_entries_are_gone() {
    let redis = RedisProcess::start_async().await;
    // Entries that live one second, indexed under /gc.
    let app = Router::new()
        .route(
            "/gc/{id}",
            axum::routing::get(|| async { ([(http::header::CACHE_CONTROL, "max-age=1")], "x") }),
        )
        .layer(
            FenceLayer::builder()
                .redis(redis.pool().await)
                .keep(Duration::ZERO)
                .prefix_strategy(PrefixStrategy::Index)
                .build()
                .unwrap(),
        );
    for i in 0..20 {
        get(&app, &format!("/gc/old{i}")).await;
    }
    let mut conn = redis.conn().await;
    let scard = |conn: &mut bb8_redis::redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let n: usize = bb8_redis::redis::cmd("SCARD")
                .arg("tf:idx:/gc")
                .query_async(&mut conn)
                .await
                .unwrap();
            n
        }
    };
    // Entries and (released) rebuild leases.
    let before = scard(&mut conn).await;
    assert!((20..=40).contains(&before), "{before}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The old entries expired; each new fill adds two members (its lease
    // and itself) and sweeps up to two dead ones.
    for i in 0..20 {
        get(&app, &format!("/gc/new{i}")).await;
    }
    let after = scard(&mut conn).await;
    assert!(
        after < before + 20,
        "dead members were swept: {before} -> {after}"
    );
}
