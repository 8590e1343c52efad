//! No stampede: single flight in one process, leases across processes,
//! early refresh, grace and stale-if-error. Counts and behaviour only;
//! timing lives in `examples/stampede.rs`.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use support::RedisProcess;
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_fence::{FenceLayer, FenceLayerBuilder};

/// An origin counting calls per route.
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<Mutex<HashMap<String, usize>>>,
    failing: Arc<AtomicBool>,
    gate: Arc<Notify>,
    gate_entered: Arc<AtomicUsize>,
}

impl Origin {
    fn calls(&self, route: &str) -> usize {
        self.calls.lock().unwrap().get(route).copied().unwrap_or(0)
    }

    fn count(&self, route: &str) -> usize {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.entry(route.to_owned()).or_default();
        *n += 1;
        *n
    }

    /// Routes, each `/{route}/{id}` so tests can use fresh keys:
    /// - `slow`: 50 ms, `max-age=60`
    /// - `short`: 20 ms, `max-age=1`
    /// - `swr`: `max-age=1, stale-while-revalidate=30`
    /// - `flaky`: `max-age=1, stale-if-error=60`; 503 while `failing`
    /// - `private`: 50 ms, `private, max-age=60`
    /// - `error`: 50 ms, a 500
    /// - `gate`: waits for `gate.notify_waiters()`, `max-age=60`
    fn router(&self) -> Router {
        async fn handler(
            State(origin): State<Origin>,
            Path((route, _id)): Path<(String, String)>,
        ) -> http::Response<Body> {
            let n = origin.count(&route);
            let (delay, cache_control, status) = match route.as_str() {
                "slow" => (50, "max-age=60", 200),
                "short" => (20, "max-age=1", 200),
                "swr" => (0, "max-age=1, stale-while-revalidate=30", 200),
                "flaky" if origin.failing.load(Ordering::SeqCst) => (0, "no-store", 503),
                "flaky" => (0, "max-age=1, stale-if-error=60", 200),
                "private" => (50, "private, max-age=60", 200),
                "error" => (50, "no-cache", 500),
                "gate" => {
                    let opened = origin.gate.notified();
                    origin.gate_entered.fetch_add(1, Ordering::SeqCst);
                    opened.await;
                    (0, "max-age=60", 200)
                }
                _ => (0, "no-store", 404),
            };
            tokio::time::sleep(Duration::from_millis(delay)).await;
            http::Response::builder()
                .status(status)
                .header("cache-control", cache_control)
                .header("content-type", "text/plain")
                .header("x-call", n.to_string())
                .body(Body::from(format!("{route} call {n}")))
                .unwrap()
        }
        Router::new()
            .route("/{route}/{id}", get(handler))
            .with_state(self.clone())
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }
}

async fn get_uri(app: Router, uri: String) -> Reply {
    let request = Request::get(uri).body(Body::empty()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), app.oneshot(request))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Fires `n` requests for `uri` at once through `app`.
async fn burst(app: &Router, uri: &str, n: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(get_uri(app.clone(), uri.to_owned())))
        .collect();
    let mut replies = Vec::with_capacity(n);
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

/// A layer on `redis`. The store timeout is generous: these tests run in
/// parallel on two cores in debug builds, and they check what the layer
/// does with answers, not how fast Redis gives them (fail-open has tests of
/// its own in `caching.rs`).
async fn redis_builder(redis: &RedisProcess) -> FenceLayerBuilder {
    FenceLayer::builder()
        .redis(redis.pool().await)
        .store_timeout(Duration::from_secs(2))
}

fn assert_identical(replies: &[Reply]) {
    let first = &replies[0];
    for reply in replies {
        assert_eq!(reply.status, first.status);
        assert_eq!(reply.body, first.body);
        assert_eq!(reply.headers["content-type"], first.headers["content-type"]);
        assert_eq!(reply.headers["x-call"], first.headers["x-call"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cold_requests_reach_the_memory_origin_once() {
    let origin = Origin::default();
    let layer = FenceLayer::builder().build().unwrap();
    let app = origin.router().layer(layer.clone());
    let replies = burst(&app, "/slow/1", 1000).await;
    assert_eq!(origin.calls("slow"), 1);
    assert_identical(&replies);
    let collapsed = replies
        .iter()
        .filter(|r| r.cache_status().contains("collapsed"))
        .count();
    assert_eq!(layer.stats().collapsed, collapsed as u64);
    assert!(collapsed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cold_requests_reach_the_redis_origin_once() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let layer = redis_builder(&redis).await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    let replies = burst(&app, "/slow/1", 1000).await;
    assert_eq!(layer.stats().store_errors, 0);
    assert_eq!(origin.calls("slow"), 1);
    assert_identical(&replies);
    assert_eq!(redis.keys_matching("tf:/slow/1#*").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_sharing_redis_reach_the_origin_once() {
    // Four layers with their own pools and no shared memory stand in for
    // four processes sharing one Redis.
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let mut apps = Vec::new();
    let mut layers = Vec::new();
    for _ in 0..4 {
        let layer = redis_builder(&redis).await.build().unwrap();
        apps.push(origin.router().layer(layer.clone()));
        layers.push(layer);
    }
    let tasks: Vec<_> = (0..1000)
        .map(|i| tokio::spawn(get_uri(apps[i % 4].clone(), "/slow/fleet".to_owned())))
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    assert_eq!(origin.calls("slow"), 1);
    assert_identical(&replies);
    let remote_waits: u64 = layers.iter().map(|l| l.stats().remote_waits).sum();
    let timeouts: u64 = layers.iter().map(|l| l.stats().wait_timeouts).sum();
    assert_eq!(timeouts, 0);
    assert!(remote_waits <= 3, "one leader per other process at most");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_on_a_short_ttl_is_refreshed_early_and_never_misses() {
    let origin = Origin::default();
    let layer = FenceLayer::builder().xfetch_beta(10.0).build().unwrap();
    let app = origin.router().layer(layer.clone());
    let warm = get_uri(app.clone(), "/short/1".to_owned()).await;
    assert!(warm.cache_status().contains("fwd=uri-miss"));
    let mut not_hits = Vec::new();
    // About three TTLs of steady traffic.
    for _ in 0..600 {
        let reply = get_uri(app.clone(), "/short/1".to_owned()).await;
        assert_eq!(reply.status, StatusCode::OK);
        if !reply.cache_status().starts_with("tower-fence; hit; ttl=") {
            not_hits.push(reply.cache_status().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(not_hits.is_empty(), "misses after warm-up: {not_hits:?}");
    assert!(
        origin.calls("short") >= 3,
        "refreshed: {}",
        origin.calls("short")
    );
    assert!(layer.stats().refreshes >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_client_is_gone_still_answers_its_waiters() {
    let origin = Origin::default();
    let app = origin.router().layer(FenceLayer::memory());
    let leader = tokio::spawn(get_uri(app.clone(), "/gate/1".to_owned()));
    while origin.gate_entered.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiters: Vec<_> = (0..20)
        .map(|_| tokio::spawn(get_uri(app.clone(), "/gate/1".to_owned())))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The leader's client hangs up mid-rebuild.
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    origin.gate.notify_waiters();
    for waiter in waiters {
        let reply = waiter.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, "gate call 1");
    }
    assert_eq!(origin.calls("gate"), 1);
    // And the rebuild was stored.
    let after = get_uri(app.clone(), "/gate/1".to_owned()).await;
    assert!(after.cache_status().starts_with("tower-fence; hit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_process_costs_waiters_only_the_configured_wait_and_its_rebuild_is_stored() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let layer = redis_builder(&redis)
        .await
        .wait_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    // A process took the lease and died: nobody will fill the key.
    let key = layer.cache_key(&Request::get("/slow/dead").body(()).unwrap());
    let mut conn = redis.conn().await;
    let _: () = bb8_redis::redis::cmd("SET")
        .arg(format!("{key}:lease"))
        .arg("someone-else")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let replies = burst(&app, "/slow/dead", 50).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
    }
    // One process-local rebuild after the wait, shared by the local waiters.
    assert_eq!(origin.calls("slow"), 1);
    assert_eq!(layer.stats().remote_waits, 1);
    assert_eq!(layer.stats().wait_timeouts, 1);
    // It held a permit, so it was stored although the dead lease is still
    // there: the next wave is served from the cache, not made to wait again.
    let again = burst(&app, "/slow/dead", 50).await;
    for reply in &again {
        assert!(
            reply.cache_status().contains("hit"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(origin.calls("slow"), 1);
    assert_eq!(layer.stats().remote_waits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_foreign_lease_is_taken_over() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let layer = redis_builder(&redis).await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    let key = layer.cache_key(&Request::get("/slow/expiring").body(()).unwrap());
    let mut conn = redis.conn().await;
    let _: () = bb8_redis::redis::cmd("SET")
        .arg(format!("{key}:lease"))
        .arg("crashed")
        .arg("PX")
        .arg(200)
        .query_async(&mut conn)
        .await
        .unwrap();
    let reply = get_uri(app.clone(), "/slow/expiring".to_owned()).await;
    assert!(
        reply.cache_status().contains("stored"),
        "{}",
        reply.cache_status()
    );
    assert_eq!(layer.stats().remote_waits, 1);
    assert_eq!(layer.stats().wait_timeouts, 0);
    assert_eq!(origin.calls("slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_fill_wakes_the_waiter() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let filler = redis_builder(&redis).await.build().unwrap();
    let waiter = redis_builder(&redis)
        .await
        .wait_timeout(Duration::from_secs(20))
        .fill_poll_interval(Duration::from_secs(10))
        .build()
        .unwrap();
    let filler_app = origin.router().layer(filler);
    let waiter_app = origin.router().layer(waiter.clone());
    let first = tokio::spawn(get_uri(filler_app, "/gate/remote".to_owned()));
    while origin.gate_entered.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = tokio::spawn(get_uri(waiter_app, "/gate/remote".to_owned()));
    while waiter.stats().remote_waits == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    origin.gate.notify_waiters();
    let started = std::time::Instant::now();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(first.body, second.body);
    assert_eq!(origin.calls("gate"), 1);
    // With a 10 s poll, only the fill notification can have woken it.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        second.cache_status().contains("collapsed"),
        "{}",
        second.cache_status()
    );
}

#[tokio::test]
async fn grace_serves_stale_while_one_request_refreshes() {
    let origin = Origin::default();
    let layer = FenceLayer::memory();
    let app = origin.router().layer(layer.clone());
    let first = get_uri(app.clone(), "/swr/1".to_owned()).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = burst(&app, "/swr/1", 20).await;
    for reply in &stale {
        assert_eq!(reply.body, first.body, "the stale value, at once");
        assert!(
            reply
                .cache_status()
                .starts_with("tower-fence; hit; ttl=-1; detail=stale-while-revalidate"),
            "{}",
            reply.cache_status()
        );
    }
    // One background refresh for the twenty stale hits.
    for _ in 0..100 {
        if origin.calls("swr") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(origin.calls("swr"), 2);
    let fresh = get_uri(app.clone(), "/swr/1".to_owned()).await;
    assert_eq!(fresh.body, "swr call 2");
    assert!(fresh.cache_status().starts_with("tower-fence; hit; ttl=0"));
    assert_eq!(layer.stats().stale_hits, 20);
}

#[tokio::test]
async fn stale_if_error_serves_stale_while_the_origin_fails() {
    let origin = Origin::default();
    let app = origin.router().layer(FenceLayer::memory());
    let first = get_uri(app.clone(), "/flaky/1".to_owned()).await;
    origin.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let replies = burst(&app, "/flaky/1", 10).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, first.body);
        assert!(
            reply.cache_status().contains("detail=stale-if-error")
                || reply.cache_status().contains("collapsed"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(origin.calls("flaky"), 2, "one rebuild for the ten requests");
    origin.failing.store(false, Ordering::SeqCst);
    let healed = get_uri(app.clone(), "/flaky/1".to_owned()).await;
    assert_eq!(healed.body, "flaky call 3");
}

#[tokio::test]
async fn stale_if_error_covers_inner_service_errors() {
    let failing = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = {
        let (failing, calls) = (failing.clone(), calls.clone());
        tower::service_fn(move |_req: Request<Body>| {
            let (failing, calls) = (failing.clone(), calls.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if failing.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other("origin down"));
                }
                Ok(http::Response::builder()
                    .header("cache-control", "max-age=1")
                    .body(Body::from(format!("call {n}")))
                    .unwrap())
            }
        })
    };
    let layer = FenceLayer::builder()
        .stale_if_error(Duration::from_secs(60))
        .build()
        .unwrap();
    let svc = tower::Layer::layer(&layer, svc);
    let call = |svc: tower_fence::FenceService<_>| async move {
        let response = svc
            .oneshot(Request::get("/x").body(Body::empty()).unwrap())
            .await?;
        let status = response.headers()["cache-status"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Ok::<_, std::io::Error>((status, body))
    };
    call(svc.clone()).await.unwrap();
    failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = call(svc.clone()).await.unwrap();
    assert_eq!(body, "call 1");
    assert!(status.contains("detail=stale-if-error"), "{status}");
    // Without a usable stale entry the error passes through untouched.
    let fresh_key = svc
        .clone()
        .oneshot(Request::get("/other").body(Body::empty()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(fresh_key.to_string(), "origin down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_responses_are_never_shared_and_the_key_turns_hit_for_miss() {
    let origin = Origin::default();
    let layer = FenceLayer::memory();
    let app = origin.router().layer(layer.clone());
    let replies = burst(&app, "/private/1", 20).await;
    let mut calls_seen: Vec<String> = replies
        .iter()
        .map(|r| r.headers["x-call"].to_str().unwrap().to_owned())
        .collect();
    calls_seen.sort();
    calls_seen.dedup();
    assert_eq!(calls_seen.len(), 20, "each request got its own response");
    for reply in &replies {
        assert!(!reply.cache_status().contains("collapsed"));
        assert!(
            reply.cache_status().contains("detail=private"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(origin.calls("private"), 20);
    // Hit-for-miss: later requests go straight to the origin, in parallel.
    let before = layer.stats().collapsed;
    burst(&app, "/private/1", 10).await;
    assert_eq!(layer.stats().collapsed, before);
    assert_eq!(origin.calls("private"), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_origin_sees_one_request_per_rebuild() {
    let origin = Origin::default();
    let app = origin.router().layer(FenceLayer::memory());
    let replies = burst(&app, "/error/1", 100).await;
    assert_eq!(origin.calls("error"), 1);
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert!(replies
        .iter()
        .any(|r| r.cache_status().contains("collapsed")));
    // Nothing was stored: the next request asks again.
    get_uri(app.clone(), "/error/1".to_owned()).await;
    assert_eq!(origin.calls("error"), 2);
}
