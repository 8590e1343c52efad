//! The layer on a Redis Cluster: hits, the stampede, invalidation of keys
//! spread over several slots and nodes, tags, the fenced fill and the fill
//! feed, all through `RedisClusterStore`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::routing::any;
use axum::Router;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::RedisCluster;
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_fence::invalidate::PrefixStrategy;
use tower_fence::store::RedisClusterStore;
use tower_fence::{FenceLayer, FenceLayerBuilder};

async fn start_cluster() -> RedisCluster {
    tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .expect("RedisCluster::start panicked")
}

fn builder(cluster: &RedisCluster) -> FenceLayerBuilder {
    FenceLayer::builder()
        .store(RedisClusterStore::new(cluster.nodes()).expect("valid node addresses"))
        .store_timeout(Duration::from_secs(5))
}

/// An origin: `GET` answers `max-age=60` with a body naming the path and
/// the call, tagged by `?tags=`; `/slow/..` sleeps 100 ms first and
/// `/gate/..` waits for the gate. Other methods answer 204.
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

    async fn wait_gate_entered(&self, n: usize) {
        while self.gate_entered.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn router(&self) -> Router {
        async fn handler(
            State(origin): State<Origin>,
            method: Method,
            Path(path): Path<String>,
            RawQuery(query): RawQuery,
        ) -> http::Response<Body> {
            if method != Method::GET {
                return http::Response::builder()
                    .status(StatusCode::NO_CONTENT)
                    .body(Body::empty())
                    .unwrap();
            }
            if path.starts_with("gate/") {
                let opened = origin.gate.notified();
                origin.gate_entered.fetch_add(1, Ordering::SeqCst);
                opened.await;
            }
            if path.starts_with("slow/") {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let n = origin.gets.fetch_add(1, Ordering::SeqCst) + 1;
            let mut response = http::Response::builder().header("cache-control", "max-age=60");
            let tags = query
                .unwrap_or_default()
                .split('&')
                .find_map(|pair| pair.strip_prefix("tags=").map(str::to_owned));
            if let Some(tags) = tags {
                response = response.header("surrogate-key", tags.replace("%20", " "));
            }
            response
                .body(Body::from(format!("/{path} call {n}")))
                .unwrap()
        }
        Router::new()
            .route("/{*path}", any(handler))
            .with_state(self.clone())
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    cache_status: String,
    body: String,
}

impl Reply {
    fn is_hit(&self) -> bool {
        self.cache_status.starts_with("tower-fence; hit")
    }
}

async fn send(app: &Router, method: Method, uri: &str) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "shop.example")
        .body(Body::empty())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), app.clone().oneshot(request))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        cache_status: parts
            .headers
            .get("cache-status")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Method::GET, uri).await
}

/// Fills each of `uris` and checks the second read is a hit.
async fn warm(app: &Router, uris: &[String]) {
    for uri in uris {
        get(app, uri).await;
        assert!(get(app, uri).await.is_hit(), "{uri} is cached");
    }
}

/// How many nodes hold at least one key matching `glob`.
async fn nodes_holding(cluster: &RedisCluster, glob: &str) -> usize {
    let mut holding = 0;
    for node in cluster.processes() {
        if !node.keys_matching(glob).await.is_empty() {
            holding += 1;
        }
    }
    holding
}

#[tokio::test]
async fn a_miss_then_a_hit() {
    let cluster = start_cluster().await;
    let origin = Origin::default();
    let app = origin.router().layer(builder(&cluster).build().unwrap());
    let first = get(&app, "/hello").await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.is_hit(), "{}", first.cache_status);
    let second = get(&app, "/hello").await;
    assert!(second.is_hit(), "{}", second.cache_status);
    assert_eq!(second.body, first.body);
    assert_eq!(origin.gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_cold_requests_reach_the_origin_once() {
    let cluster = start_cluster().await;
    let origin = Origin::default();
    let app = origin.router().layer(builder(&cluster).build().unwrap());
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { get(&app, "/slow/cold").await })
        })
        .collect();
    let mut bodies = Vec::new();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        bodies.push(reply.body);
    }
    assert_eq!(origin.gets(), 1);
    assert!(
        bodies.iter().all(|b| b == "/slow/cold call 1"),
        "{bodies:?}"
    );
}

/// Two layers (two processes) on one cluster: the second waits for the
/// first's rebuild and is woken by the fill feed, not by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_fill_wakes_the_waiter() {
    let cluster = start_cluster().await;
    let origin = Origin::default();
    let filler = builder(&cluster).build().unwrap();
    let waiter = builder(&cluster)
        .wait_timeout(Duration::from_secs(20))
        .fill_poll_interval(Duration::from_secs(10))
        .build()
        .unwrap();
    let filler_app = origin.router().layer(filler);
    let waiter_app = origin.router().layer(waiter.clone());
    let first = tokio::spawn(async move { get(&filler_app, "/gate/remote").await });
    origin.wait_gate_entered(1).await;
    let second = tokio::spawn(async move { get(&waiter_app, "/gate/remote").await });
    while waiter.stats().remote_waits == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    origin.gate.notify_waiters();
    let started = std::time::Instant::now();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(first.body, second.body);
    assert_eq!(origin.gets(), 1);
    // With a 10 s poll, only the fill notification can have woken it.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        second.cache_status.contains("collapsed"),
        "{}",
        second.cache_status
    );
}

async fn a_write_clears_a_prefix_spread_over_slots(strategy: PrefixStrategy) {
    let cluster = start_cluster().await;
    let origin = Origin::default();
    let layer = builder(&cluster).prefix_strategy(strategy).build().unwrap();
    let app = origin.router().layer(layer);
    let items: Vec<String> = (1..=30).map(|i| format!("/items/{i}")).collect();
    warm(&app, &items).await;
    warm(&app, &["/itemsX".to_owned(), "/other/1".to_owned()]).await;
    // The entries' hash tags put them on every node, not just one.
    assert_eq!(nodes_holding(&cluster, "*/items/*").await, 3);

    let write = send(&app, Method::PUT, "/items").await;
    assert_eq!(write.status, StatusCode::NO_CONTENT);
    for uri in &items {
        assert!(!get(&app, uri).await.is_hit(), "{uri} was invalidated");
    }
    assert!(get(&app, "/itemsX").await.is_hit(), "/itemsX is kept");
    assert!(get(&app, "/other/1").await.is_hit(), "/other/1 is kept");
}

#[tokio::test]
async fn a_write_clears_a_prefix_spread_over_slots_by_scan() {
    a_write_clears_a_prefix_spread_over_slots(PrefixStrategy::Scan).await;
}

#[tokio::test]
async fn a_write_clears_a_prefix_spread_over_slots_by_index() {
    a_write_clears_a_prefix_spread_over_slots(PrefixStrategy::Index).await;
}

#[tokio::test]
async fn tags_invalidate_across_slots() {
    let cluster = start_cluster().await;
    let origin = Origin::default();
    let layer = builder(&cluster).build().unwrap();
    let app = origin.router().layer(layer.clone());
    let tagged: Vec<String> = (1..=20)
        .map(|i| format!("/products/{i}?tags=catalog%20p{i}"))
        .collect();
    warm(&app, &tagged).await;
    warm(&app, &["/products/other?tags=elsewhere".to_owned()]).await;
    assert!(nodes_holding(&cluster, "*/products/*").await >= 2);

    let invalidator = layer.invalidator();
    let removed = invalidator.invalidate_tag("catalog").await.unwrap();
    assert_eq!(removed, 20);
    for uri in &tagged {
        assert!(!get(&app, uri).await.is_hit(), "{uri} was invalidated");
    }
    assert!(get(&app, "/products/other?tags=elsewhere").await.is_hit());
    // The refilled entries joined the tag again: a second invalidation
    // finds them.
    warm(&app, &tagged[..3]).await;
    invalidator.invalidate_tag("p2").await.unwrap();
    assert!(get(&app, &tagged[0]).await.is_hit());
    assert!(!get(&app, &tagged[1]).await.is_hit());
}

async fn a_rebuild_that_started_before_a_write_is_not_stored(strategy: PrefixStrategy) {
    let cluster = start_cluster().await;
    let origin = Origin::default();
    let layer = builder(&cluster).prefix_strategy(strategy).build().unwrap();
    let app = origin.router().layer(layer.clone());
    // A rebuild starts and stalls inside the origin, holding its lease.
    let reader = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/gate/1").await }
    });
    origin.wait_gate_entered(1).await;
    // The write goes through meanwhile and invalidates (inline): the lease
    // is gone.
    let write = send(&app, Method::PUT, "/gate/1").await;
    assert_eq!(write.status, StatusCode::NO_CONTENT);
    // The stalled rebuild finishes with what it read before the write.
    origin.gate.notify_waiters();
    let stale = reader.await.unwrap();
    assert_eq!(stale.status, StatusCode::OK);
    assert!(
        !stale.cache_status.contains("stored"),
        "{}",
        stale.cache_status
    );
    assert_eq!(layer.stats().fenced_out, 1);
    // It was not stored: the next read goes to the origin.
    let next = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/gate/1").await }
    });
    origin.wait_gate_entered(2).await;
    origin.gate.notify_waiters();
    let fresh = next.await.unwrap();
    assert!(!fresh.is_hit());
    assert_eq!(origin.gets(), 2);
    // And that one was stored.
    assert!(get(&app, "/gate/1").await.is_hit());
}

#[tokio::test]
async fn a_rebuild_that_started_before_a_write_is_not_stored_by_scan() {
    a_rebuild_that_started_before_a_write_is_not_stored(PrefixStrategy::Scan).await;
}

#[tokio::test]
async fn a_rebuild_that_started_before_a_write_is_not_stored_by_index() {
    a_rebuild_that_started_before_a_write_is_not_stored(PrefixStrategy::Index).await;
}

/// A soft purge over slots on every node: each entry is served stale once
/// (within grace) and refreshed once; prefix (both strategies) and tag.
#[tokio::test]
async fn a_soft_purge_marks_entries_stale_across_slots() {
    let cluster = start_cluster().await;
    for (strategy, by_tag) in [
        (PrefixStrategy::Scan, false),
        (PrefixStrategy::Index, false),
        (PrefixStrategy::Scan, true),
    ] {
        let origin = Origin::default();
        let layer = builder(&cluster)
            .namespace(format!("soft{}:", fastrand::u32(..)))
            .prefix_strategy(strategy)
            .grace(Duration::from_secs(60))
            .build()
            .unwrap();
        let app = origin.router().layer(layer.clone());
        let uris: Vec<String> = (0..12).map(|i| format!("/soft/{i}?tags=soft")).collect();
        warm(&app, &uris).await;
        let mut bodies = Vec::new();
        for uri in &uris {
            bodies.push(get(&app, uri).await.body);
        }
        let before = origin.gets();
        let soft = layer.invalidator().soft();
        let changed = if by_tag {
            soft.invalidate_tag("soft").await.unwrap()
        } else {
            soft.invalidate_prefix("/soft").await.unwrap()
        };
        assert_eq!(changed, 12, "{strategy:?} tag={by_tag}");
        for (uri, body) in uris.iter().zip(&bodies) {
            let stale = get(&app, uri).await;
            assert!(
                stale.cache_status.contains("stale-while-revalidate"),
                "{uri}: {}",
                stale.cache_status
            );
            assert_eq!(&stale.body, body, "the entry as it was");
        }
        // Each refreshed once, in the background.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while origin.gets() < before + uris.len() {
            assert!(tokio::time::Instant::now() < deadline, "refreshes ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for uri in &uris {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !get(&app, uri).await.is_hit() {
                assert!(tokio::time::Instant::now() < deadline, "{uri} refreshed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(
            origin.gets(),
            before + uris.len(),
            "{strategy:?} tag={by_tag}"
        );
    }
}
