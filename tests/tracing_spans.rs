//! Work the layer spawns (a rebuild, a background refresh, a write's
//! invalidation) runs in the span of the request that caused it, so that
//! an OpenTelemetry bridge in the app sees one trace.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};
use tower_fence::store::{KeyPattern, MemoryStore, Store, StoreFuture};
use tower_fence::{Clock, FenceLayer};
use tracing::Instrument;

/// The names of the spans current where something ran, in order.
type Seen = Arc<Mutex<Vec<(&'static str, Option<&'static str>)>>>;

fn current() -> Option<&'static str> {
    tracing::Span::current().metadata().map(|m| m.name())
}

/// A memory store that notes the span current when it is asked to
/// invalidate.
#[derive(Debug)]
struct Noting {
    inner: MemoryStore,
    seen: Seen,
}

impl Store for Noting {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        self.inner.get(key)
    }
    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        self.inner.put(key, record, ttl)
    }
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.inner.delete(key)
    }
    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        self.seen.lock().unwrap().push(("invalidation", current()));
        self.inner.delete_matching(pattern)
    }
}

#[test]
fn rebuilds_refreshes_and_invalidations_carry_the_requests_span() {
    let subscriber = tracing_subscriber::registry();
    tracing::subscriber::with_default(subscriber, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run());
    });
}

async fn run() {
    let seen: Seen = Arc::default();
    let clock = Clock::manual();
    let layer = FenceLayer::builder()
        .store(Noting {
            inner: MemoryStore::default(),
            seen: seen.clone(),
        })
        .grace(Duration::from_secs(60))
        .clock(clock.clone())
        .build()
        .unwrap();
    let origin = {
        let seen = seen.clone();
        service_fn(move |request: Request<Full<Bytes>>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(("origin", current()));
                let mut response = Response::new(Full::new(Bytes::from_static(b"hi")));
                if request.method() == Method::GET {
                    response
                        .headers_mut()
                        .insert("cache-control", "max-age=1".parse().unwrap());
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let svc = layer.layer(origin);
    let send = |method: Method, name: &'static str| {
        let svc = svc.clone();
        async move {
            let request = Request::builder()
                .method(method)
                .uri("/page")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let span = match name {
                "miss" => tracing::info_span!("miss"),
                "stale" => tracing::info_span!("stale"),
                _ => tracing::info_span!("write"),
            };
            let response = svc.oneshot(request).instrument(span).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
    };
    // A miss: its rebuild runs in a task of its own.
    send(Method::GET, "miss").await;
    // Stale within grace: a background refresh.
    clock.advance(Duration::from_secs(5));
    send(Method::GET, "stale").await;
    for _ in 0..100 {
        if seen.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A write: its invalidation runs in a task of its own.
    send(Method::POST, "write").await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("origin", Some("miss")),
            ("origin", Some("stale")),
            ("origin", Some("write")),
            ("invalidation", Some("write")),
        ]
    );
}
