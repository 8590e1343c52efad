//! The request's way on its edges (issue "One flow, safe by default"): a
//! failing inner service, a wait that runs out, a write that lands during
//! a rebuild, personal requests that rebuild alone, and leaders that stream.
//! Interleavings are forced with `Notify` gates, not sleeps; each test
//! counts origin calls and compares bodies with the origin's version.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
use tokio::sync::Notify;
use tower::{service_fn, ServiceExt};
use tower_fence::{FenceLayer, FenceLayerBuilder};

/// An origin whose `GET /item` answers the current version, optionally
/// after a gate opens, and whose `POST /item` moves the version on.
#[derive(Clone, Default)]
struct Versioned {
    version: Arc<AtomicUsize>,
    gets: Arc<AtomicUsize>,
    gated: Arc<std::sync::atomic::AtomicBool>,
    entered: Arc<Notify>,
    gate: Arc<Notify>,
}

impl Versioned {
    fn current(&self) -> String {
        format!("v{}", self.version.load(Ordering::SeqCst))
    }

    fn router(&self) -> Router {
        async fn read(State(o): State<Versioned>, headers: HeaderMap) -> impl IntoResponse {
            o.gets.fetch_add(1, Ordering::SeqCst);
            let version = o.version.load(Ordering::SeqCst);
            if o.gated.load(Ordering::SeqCst) {
                o.entered.notify_one();
                o.gate.notified().await;
            }
            let cc = if headers.contains_key("authorization") {
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
            origin.entered.notified().await;
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
            origin.gate.notify_one();
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
        let app = origin.router().layer(builder.build().unwrap());
        origin.gated.store(true, Ordering::SeqCst);
        let early = tokio::spawn({
            let app = app.clone();
            async move { send(&app, Method::GET, "/item", true).await }
        });
        origin.entered.notified().await;
        origin.gated.store(false, Ordering::SeqCst);
        send(&app, Method::POST, "/item", false).await;
        origin.gate.notify_one();
        let (_, old, _) = early.await.unwrap();
        assert_eq!(old, "v0");
        let (_, body, cache_status) = send(&app, Method::GET, "/item", true).await;
        assert_eq!(body, "v1", "{name}: {cache_status}");
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
        gate.notify_waiters();
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
