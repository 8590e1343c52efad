//! Soft purge: invalidations that mark entries stale instead of deleting
//! them. Within grace the next request is served the old entry while one
//! refresh replaces it (no stampede after a purge); past grace it is a miss
//! that revalidates. Leases go either way, so a rebuild that read the origin
//! before the purge stores nothing. Memory and Redis, both prefix
//! strategies, every kind of target.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bb8_redis::redis;
use http::{Method, Request};
use http_body_util::BodyExt;
use support::RedisProcess;
use tokio::sync::Semaphore;
use tower::{Layer, ServiceExt};
use tower_fence::invalidate::{Invalidator, PrefixStrategy, Purge};
use tower_fence::store::{MemoryStore, RedisStore, Store};
use tower_fence::{CacheOutcome, FenceLayer, FenceLayerBuilder, Served};

/// An origin whose content has a version: `GET /items/{id}` answers
/// `item {id} v{version}` with a strong ETag of the version, `304` to a
/// matching `If-None-Match`, and tags `items item-{id}`; `PUT` bumps the
/// version. It counts calls and revalidations; `gate` (when closed) holds
/// each `GET` until a permit is added.
#[derive(Clone, Default)]
struct Origin {
    version: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    revalidations: Arc<AtomicUsize>,
    gate: Option<Arc<Semaphore>>,
}

impl Origin {
    fn new() -> Self {
        let origin = Origin::default();
        origin.version.store(1, Ordering::SeqCst);
        origin
    }

    fn gated() -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let origin = Origin {
            gate: Some(gate.clone()),
            ..Origin::new()
        };
        (origin, gate)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn bump(&self) -> usize {
        self.version.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn body(&self, id: &str) -> String {
        format!("item {id} v{}", self.version.load(Ordering::SeqCst))
    }

    fn router(&self) -> Router {
        async fn item(
            State(origin): State<Origin>,
            axum::extract::Path(id): axum::extract::Path<String>,
            headers: HeaderMap,
        ) -> Response {
            origin.calls.fetch_add(1, Ordering::SeqCst);
            // What the origin read is what it answers, however long the
            // gate then holds it.
            let version = origin.version.load(Ordering::SeqCst);
            if let Some(gate) = &origin.gate {
                gate.acquire().await.unwrap().forget();
            }
            let etag = format!("\"v{version}\"");
            let mut out = HeaderMap::new();
            out.insert("etag", HeaderValue::from_str(&etag).unwrap());
            out.insert("cache-control", HeaderValue::from_static("max-age=60"));
            out.insert(
                "surrogate-key",
                HeaderValue::from_str(&format!("items item-{id}")).unwrap(),
            );
            if let Some(asked) = headers.get("if-none-match") {
                origin.revalidations.fetch_add(1, Ordering::SeqCst);
                if asked.as_bytes() == etag.as_bytes() {
                    return (StatusCode::NOT_MODIFIED, out).into_response();
                }
            }
            (out, format!("item {id} v{version}")).into_response()
        }
        async fn put(State(origin): State<Origin>) -> &'static str {
            origin.bump();
            "ok"
        }
        Router::new()
            .route("/items/{id}", get(item).put(put))
            .with_state(self.clone())
    }
}

struct Backend {
    redis: Option<RedisProcess>,
    strategy: PrefixStrategy,
}

impl Backend {
    async fn all() -> Vec<Backend> {
        let mut backends = Vec::new();
        for strategy in [PrefixStrategy::Scan, PrefixStrategy::Index] {
            backends.push(Backend {
                redis: None,
                strategy,
            });
            backends.push(Backend {
                redis: Some(RedisProcess::start_async().await),
                strategy,
            });
        }
        backends
    }

    async fn store(&self) -> Arc<dyn Store> {
        match &self.redis {
            None => Arc::new(MemoryStore::default()),
            Some(redis) => Arc::new(RedisStore::new(redis.pool().await)),
        }
    }

    async fn builder(&self, grace: Duration) -> FenceLayerBuilder {
        FenceLayer::builder()
            .store(self.store().await)
            .namespace(format!("sp{}:", fastrand::u32(..)))
            .prefix_strategy(self.strategy)
            .store_timeout(Duration::from_secs(2))
            .grace(grace)
    }

    fn name(&self) -> String {
        let store = if self.redis.is_some() {
            "redis"
        } else {
            "memory"
        };
        format!("{store}/{:?}", self.strategy)
    }
}

type Svc = tower_fence::FenceService<Router>;

struct Answer {
    status: StatusCode,
    body: String,
    cache_status: String,
    served: Option<Served>,
}

async fn send(svc: &Svc, method: Method, path: &str) -> Answer {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), svc.clone().oneshot(request))
        .await
        .expect("the layer answers")
        .unwrap();
    let status = response.status();
    let served = response
        .extensions()
        .get::<CacheOutcome>()
        .map(CacheOutcome::served);
    let cache_status = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        body: String::from_utf8(body.to_vec()).unwrap(),
        cache_status,
        served,
    }
}

async fn get_path(svc: &Svc, path: &str) -> Answer {
    send(svc, Method::GET, path).await
}

/// Asks until the origin's current body is served as a hit (the refresh a
/// stale hit started has landed), at most 20 s.
async fn until_refreshed(svc: &Svc, origin: &Origin, path: &str, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = get_path(svc, path).await;
        if answer.body == origin.body(id) && answer.cache_status.contains("; hit") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refreshed: {} / {}",
            answer.body,
            answer.cache_status
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Prefix,
    Path,
    Tag,
    Request,
}

async fn soft_purge(invalidator: &Invalidator, kind: Kind) -> u64 {
    let soft = invalidator.soft();
    assert_eq!(soft.purge(), Purge::Soft);
    match kind {
        Kind::Prefix => soft.invalidate_prefix("/items").await,
        Kind::Path => soft.invalidate_path("/items/1").await,
        Kind::Tag => soft.invalidate_tag("item-1").await,
        Kind::Request => {
            let request = Request::get("/items/1").body(()).unwrap();
            soft.invalidate_request(&request).await
        }
    }
    .expect("the soft purge applies")
}

#[tokio::test]
async fn a_soft_purge_serves_stale_once_and_refreshes_once() {
    for backend in Backend::all().await {
        for kind in [Kind::Prefix, Kind::Path, Kind::Tag, Kind::Request] {
            let origin = Origin::new();
            let layer = backend
                .builder(Duration::from_secs(60))
                .await
                .build()
                .unwrap();
            let svc = layer.layer(origin.router());
            let case = format!("{} {kind:?}", backend.name());

            assert_eq!(get_path(&svc, "/items/1").await.body, "item 1 v1", "{case}");
            assert_eq!(get_path(&svc, "/items/2").await.body, "item 2 v1", "{case}");
            let hit = get_path(&svc, "/items/1").await;
            assert!(
                hit.cache_status.contains("; hit"),
                "{case}: {}",
                hit.cache_status
            );
            assert_eq!(origin.calls(), 2, "{case}");

            origin.bump();
            let changed = soft_purge(&layer.invalidator(), kind).await;
            assert!(changed >= 1, "{case}: {changed}");

            // Served at once, the old body, saying it is stale; one refresh.
            let stale = get_path(&svc, "/items/1").await;
            assert_eq!(stale.status, StatusCode::OK, "{case}");
            assert_eq!(stale.body, "item 1 v1", "{case}");
            assert_eq!(stale.served, Some(Served::Stale), "{case}");
            assert!(
                stale.cache_status.contains("ttl=-") || stale.cache_status.contains("ttl=0"),
                "{case}: {}",
                stale.cache_status
            );
            until_refreshed(&svc, &origin, "/items/1", "1").await;
            assert_eq!(origin.calls(), 3, "{case}: one refresh");

            // A prefix purge reached /items/2 as well; the others did not.
            let other = get_path(&svc, "/items/2").await;
            assert_eq!(other.body, "item 2 v1", "{case}");
            match kind {
                Kind::Prefix => {
                    until_refreshed(&svc, &origin, "/items/2", "2").await;
                    assert_eq!(origin.calls(), 4, "{case}");
                }
                _ => {
                    assert!(other.cache_status.contains("; hit"), "{case}");
                    assert!(!other.cache_status.contains("ttl=-"), "{case}");
                    assert_eq!(origin.calls(), 3, "{case}");
                }
            }
        }
    }
}

#[tokio::test]
async fn no_stampede_after_a_soft_purge() {
    for backend in Backend::all().await {
        let origin = Origin::new();
        let layer = backend
            .builder(Duration::from_secs(60))
            .await
            .build()
            .unwrap();
        let svc = layer.layer(origin.router());
        get_path(&svc, "/items/7").await;
        origin.bump();
        soft_purge(&layer.invalidator(), Kind::Prefix).await;

        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let svc = svc.clone();
            tasks.spawn(async move { get_path(&svc, "/items/7").await });
        }
        let answers = tasks.join_all().await;
        for answer in &answers {
            assert_eq!(answer.status, StatusCode::OK, "{}", backend.name());
            assert!(
                answer.body == "item 7 v1" || answer.body == "item 7 v2",
                "{}: {}",
                backend.name(),
                answer.body
            );
        }
        until_refreshed(&svc, &origin, "/items/7", "7").await;
        assert_eq!(
            origin.calls(),
            2,
            "{}: one call after the purge",
            backend.name()
        );
    }
}

#[tokio::test]
async fn past_grace_a_soft_purge_is_a_revalidating_miss() {
    for backend in Backend::all().await {
        let origin = Origin::new();
        let layer = backend.builder(Duration::ZERO).await.build().unwrap();
        let svc = layer.layer(origin.router());
        get_path(&svc, "/items/3").await;
        soft_purge(&layer.invalidator(), Kind::Tag).await;
        // Nothing changed at the origin: a 304 refreshes the stored body.
        let again = get_path(&svc, "/items/3").await;
        assert_eq!(again.body, "item 3 v1", "{}", backend.name());
        assert_eq!(origin.revalidations.load(Ordering::SeqCst), 0);
        // (A different id; the tag named item-1 only.)
        origin.version.store(1, Ordering::SeqCst);
        get_path(&svc, "/items/1").await;
        let calls = origin.calls();
        soft_purge(&layer.invalidator(), Kind::Tag).await;
        let revalidated = get_path(&svc, "/items/1").await;
        assert_eq!(revalidated.body, "item 1 v1", "{}", backend.name());
        assert_eq!(origin.calls(), calls + 1, "{}", backend.name());
        assert_eq!(
            origin.revalidations.load(Ordering::SeqCst),
            1,
            "{}: the miss asked with If-None-Match",
            backend.name()
        );
        let hit = get_path(&svc, "/items/1").await;
        assert!(hit.cache_status.contains("; hit"), "{}", backend.name());
        assert_eq!(origin.calls(), calls + 1, "{}", backend.name());
    }
}

#[tokio::test]
async fn writes_can_soft_purge_by_default() {
    for backend in Backend::all().await {
        let origin = Origin::new();
        let layer = backend
            .builder(Duration::from_secs(60))
            .await
            .write_purge(Purge::Soft)
            .build()
            .unwrap();
        let svc = layer.layer(origin.router());
        get_path(&svc, "/items/5").await;
        let put = send(&svc, Method::PUT, "/items/5").await;
        assert_eq!(put.status, StatusCode::OK);
        let stale = get_path(&svc, "/items/5").await;
        assert_eq!(
            stale.body,
            "item 5 v1",
            "{}: stale within grace",
            backend.name()
        );
        until_refreshed(&svc, &origin, "/items/5", "5").await;
        // An Invalidator still purges hard unless asked.
        origin.bump();
        layer
            .invalidator()
            .invalidate_path("/items/5")
            .await
            .unwrap();
        let fresh = get_path(&svc, "/items/5").await;
        assert_eq!(fresh.body, origin.body("5"), "{}", backend.name());
    }
}

#[tokio::test]
async fn a_rebuild_running_during_a_soft_purge_stores_nothing() {
    for backend in Backend::all().await {
        let (origin, gate) = Origin::gated();
        let layer = backend
            .builder(Duration::from_secs(60))
            .await
            .build()
            .unwrap();
        let svc = layer.layer(origin.router());
        // A miss whose rebuild read the origin before the purge...
        let first = {
            let svc = svc.clone();
            tokio::spawn(async move { get_path(&svc, "/items/9").await })
        };
        while origin.calls() == 0 {
            tokio::task::yield_now().await;
        }
        origin.bump();
        soft_purge(&layer.invalidator(), Kind::Prefix).await;
        gate.add_permits(1);
        assert_eq!(first.await.unwrap().body, "item 9 v1", "{}", backend.name());
        // ...stored nothing: the next request goes to the origin.
        gate.add_permits(10);
        let next = get_path(&svc, "/items/9").await;
        assert_eq!(next.body, "item 9 v2", "{}", backend.name());
        assert_eq!(origin.calls(), 2, "{}", backend.name());
    }
}

#[tokio::test]
async fn a_soft_purge_in_redis_keeps_the_records_ttl() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::new();
    let layer = FenceLayer::builder()
        .store(RedisStore::new(redis.pool().await))
        .namespace("ttl:")
        .grace(Duration::from_secs(60))
        .build()
        .unwrap();
    let svc = layer.layer(origin.router());
    get_path(&svc, "/items/1").await;
    let keys = redis.keys_matching("ttl:/items/1#*").await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let mut conn = redis.conn().await;
    let before: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    let record_before: Vec<u8> = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(soft_purge(&layer.invalidator(), Kind::Path).await, 1);
    let after: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    let record_after: Vec<u8> = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(after > 0 && after <= before, "{before} → {after}");
    assert_eq!(record_before.len(), record_after.len());
    // Only the three times after `stored_at` changed (fresh, grace and
    // stale-if-error ends): head (3), key length (4), key, status (2),
    // stored_at (8).
    let times = 3 + 4 + keys[0].len() + 2 + 8;
    let differing: Vec<usize> = (0..record_before.len())
        .filter(|&i| record_before[i] != record_after[i])
        .collect();
    assert!(!differing.is_empty());
    assert!(
        differing.iter().all(|i| (times..times + 24).contains(i)),
        "{differing:?} outside {times}..{}",
        times + 24
    );
    // Twice is once: it is stale already.
    assert_eq!(soft_purge(&layer.invalidator(), Kind::Path).await, 0);
}

/// The Redis script and the memory store mark a record stale the same way,
/// byte for byte: for records with and without grace and stale-if-error
/// windows (one saturated past what a Lua number holds exactly), at times
/// before, at and after their freshness ends.
#[tokio::test]
async fn redis_and_memory_mark_records_stale_alike() {
    let redis = RedisProcess::start_async().await;
    let redis_store = RedisStore::new(redis.pool().await);
    let windows = [
        (Duration::ZERO, Duration::ZERO),
        (Duration::from_secs(60), Duration::ZERO),
        (Duration::from_secs(60), Duration::from_secs(3600)),
        (Duration::ZERO, Duration::from_secs(u64::MAX / 4)),
    ];
    let mut patched = 0;
    for (i, (grace, stale_if_error)) in windows.into_iter().enumerate() {
        let memory = MemoryStore::default();
        let origin = Origin::new();
        let layer = FenceLayer::builder()
            .store(memory.clone())
            .namespace("alike:")
            .grace(grace)
            .stale_if_error(stale_if_error)
            .build()
            .unwrap();
        let svc = layer.layer(origin.router());
        get_path(&svc, "/items/1").await;
        let key = layer.cache_key(&Request::get("/items/1").body(()).unwrap());
        let record = memory.get(&key).await.unwrap().expect("stored");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        // Fresh for 60 s from the origin's `Date` (whole seconds): the first
        // three times are before the end of its freshness, the others
        // after.
        for at_ms in [
            now_ms - 1_000,
            now_ms,
            now_ms + 30_000,
            now_ms + 120_000,
            now_ms + 10_000_000,
        ] {
            let memory_copy = MemoryStore::default();
            memory_copy
                .put(&key, record.clone(), Duration::from_secs(600))
                .await
                .unwrap();
            redis_store
                .put(&key, record.clone(), Duration::from_secs(600))
                .await
                .unwrap();
            let by_memory = memory_copy.mark_stale(&key, at_ms).await.unwrap();
            let by_redis = redis_store.mark_stale(&key, at_ms).await.unwrap();
            assert_eq!(by_memory, by_redis, "case {i} at {at_ms}: keys changed");
            patched += by_memory;
            assert_eq!(
                memory_copy.get(&key).await.unwrap(),
                redis_store.get(&key).await.unwrap(),
                "case {i} at {at_ms}: the records differ"
            );
        }
    }
    // Times before each record's freshness ended did patch it.
    assert_eq!(patched, 4 * 3);
}
