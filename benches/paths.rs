//! The layer's other paths, timed against what they add to:
//!
//! ```sh
//! cargo bench --bench paths
//! ```
//!
//! - `miss/bare` and `miss/memory`: a request to the origin alone, and the
//!   same request through `FenceLayer::memory()` as a miss that is stored
//!   (every request a new URL: key, lookup, flight, the rebuild task,
//!   recording the body, the fill). The difference is the miss path's
//!   overhead.
//! - `flight/1000_waiters`: 1,000 concurrent requests for one cold key,
//!   each its own task: one leads the rebuild, 999 wait for it in memory.
//!   Timed until all 1,000 have their body; the origin must be called once
//!   per iteration (checked after the run).
//! - `invalidate_prefix/{memory,redis}`: `Invalidator::invalidate_prefix`
//!   of a prefix holding 1,000 entries, beside 1,000 entries of another
//!   prefix that stay; on Redis (a private `redis-server` on a free loopback
//!   port) with the default `Scan` strategy (`SCAN MATCH` + `UNLINK`). The
//!   entries are written again, untimed, before each invalidation, and each
//!   invalidation must remove exactly the 1,000.

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_fence::store::RedisStore;
use tower_fence::{CacheOutcome, FenceLayer, Served};

use support::RedisProcess;

type Req = Request<Empty<Bytes>>;

/// The origin: a 1 KiB body, fresh for 10 minutes; counts its calls.
fn origin(
    calls: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
       + Clone
       + Send
       + 'static {
    let body = Bytes::from(vec![b'x'; 1024]);
    tower::service_fn(move |_req: Req| {
        let body = body.clone();
        calls.fetch_add(1, Ordering::Relaxed);
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

fn get(uri: &str) -> Req {
    Request::get(uri).body(Empty::new()).expect("valid request")
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio current-thread runtime")
}

/// One request through a clone of `svc`, its body collected; what the
/// cache did.
async fn call<S, B>(svc: &S, req: Req) -> Option<Served>
where
    S: Service<Req, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = svc
        .clone()
        .oneshot(req)
        .await
        .unwrap_or_else(|e| match e {});
    let served = response
        .extensions()
        .get::<CacheOutcome>()
        .map(CacheOutcome::served);
    let body = response.into_body().collect().await.expect("body");
    assert_eq!(body.to_bytes().len(), 1024, "the full body");
    served
}

fn miss(c: &mut Criterion) {
    let rt = runtime();
    let calls = Arc::new(AtomicUsize::new(0));
    let bare = origin(calls.clone());
    let memory = FenceLayer::memory().layer(origin(calls.clone()));
    let next = AtomicUsize::new(0);
    let uri = || format!("/items/{}", next.fetch_add(1, Ordering::Relaxed));
    assert_eq!(rt.block_on(call(&memory, get(&uri()))), Some(Served::Miss));

    let mut group = c.benchmark_group("miss");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.bench_function("bare", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call(&bare, get(&uri())).await) });
    });
    let before = calls.load(Ordering::Relaxed);
    let counted = AtomicUsize::new(0);
    group.bench_function("memory", |b| {
        b.to_async(&rt).iter(|| async {
            counted.fetch_add(1, Ordering::Relaxed);
            let served = call(&memory, get(&uri())).await;
            debug_assert_eq!(served, Some(Served::Miss));
            black_box(served)
        });
    });
    group.finish();
    assert_eq!(
        calls.load(Ordering::Relaxed) - before,
        counted.load(Ordering::Relaxed),
        "every measured request was a miss that called the origin once"
    );
}

fn flight(c: &mut Criterion) {
    const WAITERS: usize = 1000;
    let rt = runtime();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = FenceLayer::builder()
        .wait_timeout(Duration::from_secs(30))
        .build()
        .expect("layer")
        .layer(origin(calls.clone()));
    let mut group = c.benchmark_group("flight");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let keys = AtomicUsize::new(0);
    group.bench_function("1000_waiters", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let svc = svc.clone();
            let calls = calls.clone();
            let keys = &keys;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let uri = format!("/flight/{}", keys.fetch_add(1, Ordering::Relaxed));
                    let before = calls.load(Ordering::Relaxed);
                    let started = Instant::now();
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..WAITERS {
                        let svc = svc.clone();
                        let req = get(&uri);
                        tasks.spawn(async move { call(&svc, req).await });
                    }
                    let mut collapsed = 0;
                    while let Some(served) = tasks.join_next().await {
                        if served.expect("task") == Some(Served::Collapsed) {
                            collapsed += 1;
                        }
                    }
                    total += started.elapsed();
                    assert_eq!(
                        calls.load(Ordering::Relaxed) - before,
                        1,
                        "one origin call for {WAITERS} requests"
                    );
                    assert_eq!(collapsed, WAITERS - 1, "the others waited for it");
                }
                total
            }
        });
    });
    group.finish();
}

fn invalidate_prefix(c: &mut Criterion) {
    const KEYS: usize = 1000;
    let rt = runtime();
    let process = RedisProcess::start();
    let pool = rt.block_on(process.pool());
    let layers = [
        ("memory", FenceLayer::memory()),
        ("redis", FenceLayer::with_store(RedisStore::new(pool))),
    ];
    let mut group = c.benchmark_group("invalidate_prefix");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for (name, layer) in &layers {
        let keys = |prefix: &str| -> Vec<String> {
            (0..KEYS)
                .map(|i| layer.cache_key(&get(&format!("/bench/{prefix}/{i}"))))
                .collect()
        };
        let (hot, cold) = (keys("hot"), keys("cold"));
        let store = layer.store().clone();
        let value = Bytes::from(vec![b'v'; 100]);
        let ttl = Duration::from_secs(600);
        rt.block_on(async {
            for key in &cold {
                store.put(key, value.clone(), ttl).await.expect("put");
            }
        });
        let invalidator = layer.invalidator();
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (store, invalidator, hot, value) =
                    (store.clone(), invalidator.clone(), &hot, value.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        for key in hot {
                            store.put(key, value.clone(), ttl).await.expect("put");
                        }
                        let started = Instant::now();
                        let removed = invalidator
                            .invalidate_prefix("/bench/hot")
                            .await
                            .expect("invalidate");
                        total += started.elapsed();
                        assert_eq!(removed, KEYS as u64, "exactly the prefix's entries");
                    }
                    total
                }
            });
        });
        rt.block_on(async {
            for key in &cold {
                assert!(store.get(key).await.expect("get").is_some(), "{key} stays");
            }
        });
    }
    group.finish();
    drop(rt);
    drop(process);
}

criterion_group!(benches, miss, flight, invalidate_prefix);
criterion_main!(benches);
