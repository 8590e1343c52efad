//! The local tier in front of Redis (`FenceLayerBuilder::local_tier`): each
//! "instance" is a layer on its own `RedisStore` (own pool, own fill feed
//! reader) against one real `redis-server`. Changes made behind the layers'
//! backs (a raw `UNLINK` that tells no feed) stand for lost messages: they
//! show that a copy is served from the local tier, and for how long.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use http::{Method, Request};
use http_body_util::BodyExt;
use support::RedisProcess;
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_fence::store::{ChangeWatcher, RedisStore, Store};
use tower_fence::{Clock, FenceLayer};

/// Local TTL of every tier here.
const LOCAL_TTL: Duration = Duration::from_secs(5);
/// Bound on how long a change may take to reach another instance's feed
/// reader (it is a round trip or so; the bound only keeps a broken test
/// from hanging).
const FEED_BOUND: Duration = Duration::from_secs(10);

/// An origin whose pages are `v<version>` (tagged `t<path>`), fresh for an
/// hour; `POST` bumps the version. Counts `GET`s.
#[derive(Clone, Default)]
struct Origin {
    version: Arc<AtomicUsize>,
    gets: Arc<AtomicUsize>,
}

impl Origin {
    fn router(&self) -> Router {
        async fn page(
            State(o): State<Origin>,
            uri: http::Uri,
        ) -> impl axum::response::IntoResponse {
            o.gets.fetch_add(1, Ordering::SeqCst);
            let tag = format!("t{}", uri.path().replace('/', "-"));
            (
                [
                    ("cache-control", "max-age=3600".to_owned()),
                    ("surrogate-key", tag),
                ],
                format!("v{}", o.version.load(Ordering::SeqCst)),
            )
        }
        async fn write(State(o): State<Origin>) -> &'static str {
            o.version.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
        Router::new()
            .route("/items/{*rest}", get(page).post(write))
            .with_state(self.clone())
    }

    fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// A new version the layers are not told of.
    fn bump(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
    }
}

/// One app instance: a layer with a local tier on a store of its own.
struct Instance {
    layer: FenceLayer,
    app: Router,
    clock: Clock,
    changes: mpsc::UnboundedReceiver<String>,
}

impl Instance {
    async fn start(redis: &RedisProcess, origin: &Origin) -> Instance {
        let store = RedisStore::new(redis.pool().await);
        let clock = Clock::manual();
        let layer = FenceLayer::builder()
            .store(store.clone())
            .local_tier(1 << 20, LOCAL_TTL)
            .clock(clock.clone())
            .xfetch_beta(0.0)
            .build()
            .expect("valid config");
        // Registered after the tier's own watcher: by the time the test
        // hears of a change, the tier has dropped its copies.
        let (tx, changes) = mpsc::unbounded_channel();
        assert!(store.watch_changes(ChangeWatcher::new(move |change| {
            tx.send(format!("{change:?}")).is_ok()
        })));
        let mut instance = Instance {
            app: origin.router().layer(layer.clone()),
            layer,
            clock,
            changes,
        };
        // The tier keeps copies only once its feed is read.
        instance.heard(|c| c == "Resumed").await;
        instance
    }

    /// Waits, at most `FEED_BOUND`, until a change `pred` accepts is heard.
    async fn heard(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let wait = async {
            loop {
                let change = self.changes.recv().await.expect("feed watcher alive");
                if pred(&change) {
                    return change;
                }
            }
        };
        tokio::time::timeout(FEED_BOUND, wait)
            .await
            .expect("change heard within the bound")
    }

    async fn send(&self, method: Method, path: &str) -> (String, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("valid request");
        let response = self.app.clone().oneshot(request).await.expect("infallible");
        let status = response
            .headers()
            .get("cache-status")
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (String::from_utf8_lossy(&body).into_owned(), status)
    }

    async fn get(&self, path: &str) -> (String, String) {
        self.send(Method::GET, path).await
    }

    fn key(&self, path: &str) -> String {
        self.layer
            .cache_key(&Request::get(path).body(()).expect("valid request"))
    }
}

/// Removes `key` from Redis without telling any feed: a change whose
/// message is lost.
async fn unlink_silently(redis: &RedisProcess, key: &str) {
    let mut conn = redis.conn().await;
    let removed: u64 = redis::cmd("UNLINK")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("unlink");
    assert_eq!(removed, 1, "{key} was stored");
}

/// Caches `path` in `instance`'s local tier and proves it is served from
/// there: removed from Redis silently, it is still a hit with no origin
/// call.
async fn cache_locally(
    redis: &RedisProcess,
    origin: &Origin,
    instance: &Instance,
    path: &str,
) -> String {
    let (body, _) = instance.get(path).await;
    let (again, status) = instance.get(path).await;
    assert_eq!(again, body);
    assert!(status.contains("hit"), "{status}");
    let gets = origin.gets();
    unlink_silently(redis, &instance.key(path)).await;
    let (local, status) = instance.get(path).await;
    assert_eq!(local, body, "served from the local tier");
    assert!(status.contains("hit"), "{status}");
    assert_eq!(origin.gets(), gets);
    body
}

#[tokio::test]
async fn a_write_through_one_layer_drops_the_other_layers_copy() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let a = Instance::start(&redis, &origin).await;
    let mut b = Instance::start(&redis, &origin).await;

    assert_eq!(cache_locally(&redis, &origin, &b, "/items/1").await, "v0");
    // A misses (the key is gone from Redis) and fills v0, which B hears
    // of; A then holds a copy of its own.
    assert_eq!(a.get("/items/1").await.0, "v0");
    let key = b.key("/items/1");
    b.heard(|c| c == format!("Key({key:?})")).await;
    assert_eq!(a.get("/items/1").await.0, "v0");

    let (ok, _) = a.send(Method::POST, "/items/1").await;
    assert_eq!(ok, "ok");
    // In the writing instance, at once: no read older than the write.
    assert_eq!(a.get("/items/1").await.0, "v1");

    // In the other, once its feed reader has read the invalidation.
    b.heard(|c| c == "Many").await;
    let (body, _) = b.get("/items/1").await;
    assert_eq!(body, "v1");
}

#[tokio::test]
async fn a_fill_in_one_instance_drops_the_others_older_copy() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let a = Instance::start(&redis, &origin).await;
    let mut b = Instance::start(&redis, &origin).await;

    assert_eq!(cache_locally(&redis, &origin, &b, "/items/2").await, "v0");
    // A new version that A fills (the key is gone from Redis: A misses).
    origin.bump();
    let gets = origin.gets();
    assert_eq!(a.get("/items/2").await.0, "v1");
    assert_eq!(origin.gets(), gets + 1);

    let key = b.key("/items/2");
    b.heard(|c| c == format!("Key({key:?})")).await;
    let (body, status) = b.get("/items/2").await;
    assert_eq!(body, "v1", "B dropped its copy and read A's fill");
    assert!(status.contains("hit"), "{status}");
    assert_eq!(origin.gets(), gets + 1);
}

#[tokio::test]
async fn prefix_and_tag_invalidations_reach_the_other_instances_tier() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let a = Instance::start(&redis, &origin).await;
    let mut b = Instance::start(&redis, &origin).await;

    // Prefix.
    b.get("/items/p/1").await;
    assert!(b.get("/items/p/1").await.1.contains("hit"));
    origin.bump();
    let gets = origin.gets();
    assert_eq!(
        a.layer
            .invalidator()
            .invalidate_prefix("/items/p")
            .await
            .unwrap(),
        1
    );
    b.heard(|c| c == "Many").await;
    assert_eq!(b.get("/items/p/1").await.0, "v1");
    assert_eq!(origin.gets(), gets + 1);

    // Tag.
    b.get("/items/t/1").await;
    assert!(b.get("/items/t/1").await.1.contains("hit"));
    origin.bump();
    let gets = origin.gets();
    assert_eq!(
        a.layer
            .invalidator()
            .invalidate_tag("t-items-t-1")
            .await
            .unwrap(),
        1
    );
    b.heard(|c| c == "Many").await;
    assert_eq!(b.get("/items/t/1").await.0, "v2");
    assert_eq!(origin.gets(), gets + 1);
}

#[tokio::test]
async fn a_lost_change_is_served_at_most_the_local_ttl() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let b = Instance::start(&redis, &origin).await;

    assert_eq!(cache_locally(&redis, &origin, &b, "/items/3").await, "v0");
    origin.bump();
    b.clock.advance(LOCAL_TTL - Duration::from_millis(1));
    assert_eq!(b.get("/items/3").await.0, "v0", "within the TTL");
    b.clock.advance(Duration::from_millis(1));
    assert_eq!(b.get("/items/3").await.0, "v1", "not a moment after");
}

#[tokio::test]
async fn a_reader_that_reconnects_drops_its_tier() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let mut b = Instance::start(&redis, &origin).await;

    assert_eq!(cache_locally(&redis, &origin, &b, "/items/4").await, "v0");
    origin.bump();
    // Cut the feed reader's connection (the only blocked `XREAD`).
    let mut conn = redis.conn().await;
    let killed = tokio::time::timeout(FEED_BOUND, async {
        loop {
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut conn)
                .await
                .expect("client list");
            let ids: Vec<&str> = clients
                .lines()
                .filter(|line| line.contains("cmd=xread"))
                .filter_map(|line| line.split(' ').next()?.strip_prefix("id="))
                .collect();
            if let Some(id) = ids.first() {
                let n: u64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(*id)
                    .query_async(&mut conn)
                    .await
                    .expect("client kill");
                if n == 1 {
                    return;
                }
            }
            tokio::task::yield_now().await;
        }
    });
    killed.await.expect("feed reader found");
    b.heard(|c| c == "Lost").await;
    b.heard(|c| c == "Resumed").await;
    // The copy went with the connection; Redis has nothing, so the origin
    // is asked, within the local TTL (the clock did not move).
    assert_eq!(b.get("/items/4").await.0, "v1");
}

#[tokio::test]
async fn a_soft_purge_reaches_the_other_instances_tier() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let a = Instance::start(&redis, &origin).await;
    let mut b = Instance::start(&redis, &origin).await;
    let old = cache_locally(&redis, &origin, &b, "/items/s/1").await;
    origin.bump();
    let gets = origin.gets();
    a.layer
        .invalidator()
        .soft()
        .invalidate_path("/items/s/1")
        .await
        .unwrap();
    b.heard(|c| c == "Many").await;
    let (now, _) = b.get("/items/s/1").await;
    assert_ne!(now, old, "B's local copy was dropped");
    assert_eq!(origin.gets(), gets + 1);
}
