//! A tag invalidation against a rebuild already running: the rebuild read
//! the origin before the invalidation, and its tags come with its response,
//! too late for it to be found through the tag's set. Every lease joins the
//! namespace's in-flight set, which a tag invalidation clears first, so the
//! rebuild's fill is fenced out. 20 rounds on each store, in one process
//! and across two layers sharing the store (two processes). Interleavings
//! are forced with semaphores, not sleeps.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use support::RedisProcess;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_fence::{FenceLayer, FenceLayerBuilder};

/// `GET /p` answers the current version tagged `t` (after a gate, when
/// gated); the version moves on behind the cache's back, as a database
/// change that the application then announces with `invalidate_tag`.
#[derive(Clone)]
struct Origin {
    version: Arc<AtomicUsize>,
    gets: Arc<AtomicUsize>,
    gated: Arc<std::sync::atomic::AtomicBool>,
    entered: Arc<Semaphore>,
    gate: Arc<Semaphore>,
}

impl Origin {
    fn new() -> Origin {
        Origin {
            version: Arc::default(),
            gets: Arc::default(),
            gated: Arc::default(),
            entered: Arc::new(Semaphore::new(0)),
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    fn current(&self) -> String {
        format!("v{}", self.version.load(Ordering::SeqCst))
    }

    fn router(&self) -> Router {
        async fn read(State(o): State<Origin>) -> impl IntoResponse {
            o.gets.fetch_add(1, Ordering::SeqCst);
            let body = o.current();
            if o.gated.load(Ordering::SeqCst) {
                o.entered.add_permits(1);
                o.gate.acquire().await.unwrap().forget();
            }
            (
                [("cache-control", "max-age=60"), ("surrogate-key", "t")],
                body,
            )
        }
        async fn untagged() -> impl IntoResponse {
            ([("cache-control", "max-age=60")], "q")
        }
        Router::new()
            .route("/p", get(read))
            .route("/q", get(untagged))
            .with_state(self.clone())
    }
}

async fn get_p(app: &Router) -> (String, String) {
    get_uri(app, "/p").await
}

async fn get_uri(app: &Router, uri: &str) -> (String, String) {
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let status = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (String::from_utf8_lossy(&body).into_owned(), status)
}

async fn stores() -> Vec<(
    &'static str,
    Box<dyn Fn() -> FenceLayerBuilder>,
    Option<RedisProcess>,
)> {
    let redis = RedisProcess::start_async().await;
    let pool = redis.pool().await;
    vec![
        (
            "memory",
            {
                // Two layers on one memory store stand for two processes.
                let store = Arc::new(tower_fence::store::MemoryStore::default());
                Box::new(move || FenceLayer::builder().store(store.clone()))
            },
            None,
        ),
        (
            "redis",
            Box::new(move || {
                FenceLayer::builder()
                    .redis(pool.clone())
                    .store_timeout(Duration::from_secs(2))
            }),
            Some(redis),
        ),
    ]
}

async fn race(two_processes: bool) {
    for (name, builder, _redis) in stores().await {
        let origin = Origin::new();
        let rebuilding = builder().build().unwrap();
        let invalidating = if two_processes {
            builder().build().unwrap()
        } else {
            rebuilding.clone()
        };
        let app = origin.router().layer(rebuilding.clone());
        let reader = origin.router().layer(invalidating.clone());
        // An entry without the tag: no tag invalidation touches it.
        get_uri(&app, "/q").await;
        for round in 0..20 {
            // Start from a miss.
            rebuilding.invalidator().invalidate_tag("t").await.unwrap();
            // A rebuild reads the origin and stalls before answering.
            origin.gated.store(true, Ordering::SeqCst);
            let stalled = tokio::spawn({
                let app = app.clone();
                async move { get_p(&app).await }
            });
            tokio::time::timeout(Duration::from_secs(10), origin.entered.acquire())
                .await
                .unwrap_or_else(|_| panic!("{name} round {round}: no rebuild reached the origin"))
                .unwrap()
                .forget();
            origin.gated.store(false, Ordering::SeqCst);
            // The data changes and the application says so.
            origin.version.fetch_add(1, Ordering::SeqCst);
            invalidating
                .invalidator()
                .invalidate_tag("t")
                .await
                .unwrap();
            let after = origin.current();
            // The stalled rebuild answers now, with the old data.
            origin.gate.add_permits(1);
            let (old, _) = stalled.await.unwrap();
            assert_ne!(old, after, "{name} round {round}: the rebuild read before");
            // Its client may have it; no later read may.
            for app in [&app, &reader] {
                let (body, status) = get_p(app).await;
                assert_eq!(
                    body, after,
                    "{name} round {round}: stale after invalidate_tag ({status})"
                );
            }
            // Settle on the new version for the next round.
            tokio::time::timeout(Duration::from_secs(10), async {
                while !get_p(&app).await.1.contains("hit") {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{name} round {round}: the new version is never a hit"));
        }
        let (_, status) = get_uri(&app, "/q").await;
        assert!(
            status.contains("hit"),
            "{name}: /q was not tagged: {status}"
        );
        assert!(
            rebuilding.stats().fenced_out >= 20,
            "{name}: {:?}",
            rebuilding.stats()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_invalidation_fences_a_rebuild_running_in_this_process() {
    race(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_invalidation_fences_a_rebuild_running_in_another_process() {
    race(true).await;
}
