//! Allocations per cache hit through the whole service, counted by a
//! wrapping global allocator (`stats_alloc`), and reported:
//!
//! ```sh
//! cargo bench --bench allocations
//! ```
//!
//! Each figure is the allocator's count over 10,000 requests divided by
//! 10,000: the request is built before counting starts (it is the
//! client's), then the service is cloned, called with `oneshot`, and the
//! response's body read frame by frame and dropped (no collecting buffer,
//! which would be the client's too).
//!
//! - `bare`: the origin alone (its response's header map, body);
//! - `memory`: a hit on `FenceLayer::memory()`;
//! - `redis`: a hit on a `RedisStore` (a private `redis-server` on a free
//!   loopback port; includes the redis client's own allocations for the
//!   `GET`, on the same current-thread runtime);
//! - `tiered`: a hit in the local tier in front of that Redis.
//!
//! The memory hit's count is checked against [`MEMORY_HIT_BOUND`]: what a
//! hit must allocate (see the README's benchmark section for the list).

#[path = "../tests/support/mod.rs"]
mod support;

use std::alloc::System;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Layer, Service, ServiceExt};
use tower_fence::store::RedisStore;
use tower_fence::{CacheOutcome, FenceLayer, Served};

use support::RedisProcess;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Requests counted per figure.
const ROUNDS: usize = 10_000;

/// Most allocations a memory hit may make: the `CacheOutcome` in the
/// extensions (map, table, box) and the served header map (indices,
/// entries). The key is this thread's remembered one, an in-process store
/// is read without a future (`Store::get_now`), and the `Cache-Status`,
/// `Age` and `Content-Length` values are the thread's last ones while they
/// stay the same.
const MEMORY_HIT_BOUND: f64 = 5.0;

type Req = Request<Empty<Bytes>>;

fn origin() -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
       + Clone
       + Send
       + 'static {
    let body = Bytes::from(vec![b'x'; 1024]);
    tower::service_fn(move |_req: Req| {
        let body = body.clone();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("cache-control", "max-age=600")
                    .body(Full::new(body))
                    .expect("valid response"),
            )
        }
    })
}

fn request() -> Req {
    Request::get("http://bench.example/items/42?page=1")
        .body(Empty::new())
        .expect("valid request")
}

/// Allocations per request of `svc` (and bytes allocated per request).
async fn per_request<S, B>(svc: &S) -> (f64, f64)
where
    S: Service<Req, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let requests: Vec<Req> = (0..ROUNDS).map(|_| request()).collect();
    let region = Region::new(GLOBAL);
    for req in requests {
        let response = svc
            .clone()
            .oneshot(req)
            .await
            .unwrap_or_else(|e| match e {});
        let mut body = std::pin::pin!(response.into_body());
        while let Some(frame) = body.frame().await {
            drop(frame.expect("body frame"));
        }
    }
    let change = region.change();
    (
        change.allocations as f64 / ROUNDS as f64,
        change.bytes_allocated as f64 / ROUNDS as f64,
    )
}

/// Warms `svc` until a request is a hit.
async fn warm<S, B>(svc: &S, what: &str)
where
    S: Service<Req, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    for _ in 0..200 {
        let response = svc
            .clone()
            .oneshot(request())
            .await
            .unwrap_or_else(|e| match e {});
        let served = response
            .extensions()
            .get::<CacheOutcome>()
            .map(CacheOutcome::served);
        response.into_body().collect().await.expect("body");
        if served == Some(Served::Hit) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what}: never became a hit");
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that names none of ours
    // skips the run.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !filter.is_empty() && !filter.iter().any(|f| "allocations".contains(f.as_str())) {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let process = RedisProcess::start();
    rt.block_on(async {
        let bare = origin();
        let memory = FenceLayer::builder()
            .xfetch_beta(0.0)
            .build()
            .expect("layer")
            .layer(origin());
        let pool = process.pool().await;
        let redis_layer = FenceLayer::builder()
            .store(RedisStore::new(pool.clone()))
            .xfetch_beta(0.0)
            .build()
            .expect("layer");
        let redis = redis_layer.layer(origin());
        let tiered = FenceLayer::builder()
            .store(RedisStore::new(pool))
            .namespace("tiered:")
            .local_tier(16 * 1024 * 1024, Duration::from_secs(60))
            .xfetch_beta(0.0)
            .build()
            .expect("layer")
            .layer(origin());
        warm(&memory, "memory").await;
        warm(&redis, "redis").await;
        warm(&tiered, "tiered").await;

        println!("allocations per request ({ROUNDS} requests, 1 KiB body)");
        println!("{:<8} {:>12} {:>14}", "path", "allocations", "bytes");
        let rows = [
            ("bare", per_request(&bare).await),
            ("memory", per_request(&memory).await),
            ("redis", per_request(&redis).await),
            ("tiered", per_request(&tiered).await),
        ];
        for (name, (allocations, bytes)) in rows {
            println!("{name:<8} {allocations:>12.2} {bytes:>14.0}");
        }
        // Rounded: the cache's housekeeping (moka's, the timer's) adds an
        // allocation now and then.
        assert!(
            rows[1].1 .0.round() <= MEMORY_HIT_BOUND,
            "a memory hit allocates {:.2} times, more than {MEMORY_HIT_BOUND}",
            rows[1].1 .0
        );
    });
    drop(process);
}
