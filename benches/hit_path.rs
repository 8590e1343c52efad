//! A cache hit through the whole service, the way axum drives it: clone the
//! service, `oneshot` one request, collect the body.
//!
//! Group `hit_path`:
//! - `memory`: `FenceLayer::memory()` around a tiny origin;
//! - `redis`: the same layer on a `RedisStore`, on a private `redis-server`
//!   this bench starts on a free loopback port;
//! - `redis_raw_get`: a bare `GET` of the same stored record through the same
//!   bb8 pool (`test_on_check_out(false)`: one round trip), the floor a Redis
//!   hit is measured against;
//! - `redis_raw_get_pool_default`: the same `GET` through a pool with bb8's
//!   defaults (which `PING`s every checkout: two round trips).
//!
//! Group `breaker_open` (issue "Redis may die"): what a request costs while
//! the store is dead and the circuit breaker skips it:
//! - `layer_store_down`: the layer on a `RedisStore` whose `redis-server` was
//!   killed, the breaker open (its cool-down long enough that no probe falls
//!   in the measurement): every request goes to the origin, alone in its
//!   flight;
//! - `origin_alone`: the same request to the bare origin, the floor.
//!
//! After the group, `redis_vs_raw_get` measures the Redis hit against the
//! raw `GET` a second way, paired: rounds of [`PAIRED_BATCH`] hits and as
//! many raw `GET`s back to back (which goes first alternates), and the
//! median of the rounds' ratios. A loopback round trip drifts by more than
//! the layer's share between criterion's runs of one function and the
//! next; within a round both sides see the same machine.
//!
//! Run as `taskset -c 1 cargo bench --bench hit_path -- hit_path`, the
//! bench and the `redis-server` it starts share one core: a round trip is
//! then two context switches rather than two wake-ups across cores, its
//! time is mostly CPU, and every figure is steadier.
//!
//! Every measured path is checked first: the service must answer with a
//! `Cache-Status` hit and the raw `GET` must return the stored record.

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::time::Duration;

use bb8_redis::{bb8, redis, RedisConnectionManager};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::header::CACHE_CONTROL;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_fence::store::RedisStore;
use tower_fence::{FenceBody, FenceLayer, CACHE_STATUS};

use support::RedisProcess;

/// Size of the origin's (and so the cached) body.
const BODY_LEN: usize = 1024;
/// The one URI every request asks for.
const URI: &str = "http://bench.example/items/42?page=1";

type Req = Request<Empty<Bytes>>;
type Res = Response<FenceBody<Full<Bytes>>>;

/// The origin: a 1 KiB body, fresh for 10 minutes.
fn origin() -> impl Service<
    Req,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
> + Clone
       + Send
       + 'static {
    let body = Bytes::from(vec![b'x'; BODY_LEN]);
    tower::service_fn(move |_req: Req| {
        let body = body.clone();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header(CACHE_CONTROL, "max-age=600")
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(body))
                    .expect("valid response"),
            )
        }
    })
}

fn request() -> Req {
    Request::get(URI).body(Empty::new()).expect("valid request")
}

/// One request through a clone of `svc`, body collected (what axum does per
/// request). Returns the response head and the body bytes.
async fn call<S>(svc: &S, req: Req) -> (http::response::Parts, Bytes)
where
    S: Service<Req, Response = Res, Error = Infallible> + Clone,
{
    let response = svc
        .clone()
        .oneshot(req)
        .await
        .unwrap_or_else(|e| match e {});
    let (parts, body) = response.into_parts();
    let bytes = body
        .collect()
        .await
        .unwrap_or_else(|e| match e {})
        .to_bytes();
    (parts, bytes)
}

/// Whether the response's `Cache-Status` carries tower-fence's `hit`.
fn is_hit(parts: &http::response::Parts) -> bool {
    parts.headers.get_all(&CACHE_STATUS).iter().any(|value| {
        let mut members = value.to_str().unwrap_or("").split(';').map(str::trim);
        members.next() == Some(tower_fence::CACHE_NAME) && members.any(|p| p == "hit")
    })
}

fn cache_status(parts: &http::response::Parts) -> String {
    parts
        .headers
        .get_all(&CACHE_STATUS)
        .iter()
        .map(|v| v.to_str().unwrap_or("<non-ascii>"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fills the cache with one request, then asserts that the next one is a
/// hit with the full body. Polls a little, since a remote store writes in
/// the background.
async fn warm<S>(svc: &S, what: &str)
where
    S: Service<Req, Response = Res, Error = Infallible> + Clone,
{
    let (first, body) = call(svc, request()).await;
    assert_eq!(body.len(), BODY_LEN, "{what}: origin body");
    assert!(
        !is_hit(&first),
        "{what}: the very first request cannot be a hit: {}",
        cache_status(&first)
    );
    let mut last = String::new();
    for _ in 0..100 {
        let (parts, body) = call(svc, request()).await;
        if is_hit(&parts) {
            assert_eq!(body.len(), BODY_LEN, "{what}: cached body");
            return;
        }
        last = cache_status(&parts);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: the warm request never became a hit; last cache-status: {last}");
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio current-thread runtime")
}

/// A pool that does not `PING` on checkout, so a checked-out `GET` is one
/// round trip.
async fn pool_without_checkout_test(process: &RedisProcess) -> bb8::Pool<RedisConnectionManager> {
    let manager = RedisConnectionManager::new(process.url()).expect("valid redis url");
    bb8::Pool::builder()
        .max_size(8)
        .connection_timeout(Duration::from_secs(2))
        .test_on_check_out(false)
        .build(manager)
        .await
        .expect("build bb8 pool")
}

/// A raw `GET` of `key` through `pool`: check out, query, check in.
async fn raw_get(pool: &bb8::Pool<RedisConnectionManager>, key: &str) -> Option<Vec<u8>> {
    let mut conn = pool.get().await.expect("checkout");
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut *conn)
        .await
        .expect("GET")
}

/// Requests per side in one round of the paired measurement.
const PAIRED_BATCH: u32 = 400;
/// Rounds of the paired measurement.
const PAIRED_ROUNDS: usize = 25;

/// The paired measurement's result: each round's mean time of a Redis
/// hit and of a raw `GET`, in the same order.
struct PairedRatio {
    hit: Vec<Duration>,
    raw: Vec<Duration>,
}

impl std::fmt::Display for PairedRatio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ratios: Vec<f64> = self
            .hit
            .iter()
            .zip(&self.raw)
            .map(|(hit, raw)| hit.as_secs_f64() / raw.as_secs_f64().max(1e-12))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let quartile = |q: usize| ratios[(ratios.len() - 1) * q / 4];
        let median = |times: &[Duration]| {
            let mut times = times.to_vec();
            times.sort();
            times[times.len() / 2]
        };
        write!(
            f,
            "hit_path/redis_vs_raw_get: a Redis hit over a raw GET, {} rounds of {} each: \
             median {:.3}x (quartiles {:.3}x / {:.3}x, range {:.3}x to {:.3}x); \
             median round: hit {:.1} us, raw GET {:.1} us",
            ratios.len(),
            PAIRED_BATCH,
            quartile(2),
            quartile(1),
            quartile(3),
            ratios[0],
            ratios[ratios.len() - 1],
            median(&self.hit).as_secs_f64() * 1e6,
            median(&self.raw).as_secs_f64() * 1e6,
        )
    }
}

/// Rounds of [`PAIRED_BATCH`] Redis hits through `svc` and as many raw
/// `GET`s of `key` through `pool`, back to back, which side goes first
/// alternating from round to round.
async fn paired_ratio<S>(
    svc: &S,
    pool: &bb8::Pool<RedisConnectionManager>,
    key: &str,
) -> PairedRatio
where
    S: Service<Req, Response = Res, Error = Infallible> + Clone,
{
    let hits = || async {
        let start = std::time::Instant::now();
        for _ in 0..PAIRED_BATCH {
            black_box(call(svc, request()).await);
        }
        start.elapsed() / PAIRED_BATCH
    };
    let raws = || async {
        let start = std::time::Instant::now();
        for _ in 0..PAIRED_BATCH {
            black_box(raw_get(pool, black_box(key)).await);
        }
        start.elapsed() / PAIRED_BATCH
    };
    // One round unmeasured: connections and caches warm.
    hits().await;
    raws().await;
    let mut result = PairedRatio {
        hit: Vec::new(),
        raw: Vec::new(),
    };
    for round in 0..PAIRED_ROUNDS {
        let (hit, raw) = if round % 2 == 0 {
            let hit = hits().await;
            (hit, raws().await)
        } else {
            let raw = raws().await;
            (hits().await, raw)
        };
        result.hit.push(hit);
        result.raw.push(raw);
    }
    result
}

/// Criterion's options that take a value as the next argument.
const OPTIONS_WITH_VALUES: &[&str] = &[
    "--save-baseline",
    "--baseline",
    "--baseline-lenient",
    "--load-baseline",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--plotting-backend",
    "--output-format",
    "--color",
    "--profile-time",
];

/// Whether the bench's command-line filter (the first argument that is
/// neither an option nor an option's value: a regular expression for
/// criterion, taken here as a substring) lets `name` run. No filter lets
/// everything run.
fn criterion_filter_allows(name: &str) -> bool {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if OPTIONS_WITH_VALUES.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            return name.contains(arg.trim_start_matches('^').trim_end_matches('$'));
        }
    }
    true
}

fn hit_path(c: &mut Criterion) {
    let rt = runtime();

    // --- memory -----------------------------------------------------------
    let memory_layer = FenceLayer::memory();
    let memory = memory_layer.layer(origin());
    rt.block_on(warm(&memory, "memory"));
    let memory_before = memory_layer.stats();

    // --- redis ------------------------------------------------------------
    let process = RedisProcess::start();
    let pool = rt.block_on(pool_without_checkout_test(&process));
    let default_pool = rt.block_on(process.pool());
    let layer = FenceLayer::with_store(RedisStore::new(pool.clone()));
    let redis_svc = layer.layer(origin());
    rt.block_on(warm(&redis_svc, "redis"));

    // The entry's key, found the way an operator would: `SCAN MATCH tf:/*`
    // (a rebuild lease, `<key>:lease`, may share the prefix; `tf:inflight`
    // holds the leases of running rebuilds).
    let keys = rt.block_on(process.keys_matching("tf:/*"));
    let entries: Vec<&String> = keys.iter().filter(|k| !k.ends_with(":lease")).collect();
    assert_eq!(
        entries.len(),
        1,
        "exactly one entry after warming: {keys:?}"
    );
    let key = entries[0].clone();
    assert_eq!(
        key,
        layer.cache_key(&request()),
        "the stored key is the layer's"
    );
    let stored = rt
        .block_on(layer.store().get(&key))
        .expect("store get")
        .expect("the store holds the entry");
    assert!(stored.len() > BODY_LEN, "the record holds the body");
    for (name, p) in [("pool", &pool), ("default pool", &default_pool)] {
        let raw = rt.block_on(raw_get(p, &key));
        assert_eq!(
            raw.as_deref(),
            Some(stored.as_ref()),
            "raw GET through the {name} returns the stored record"
        );
    }

    let redis_before = layer.stats();

    let mut group = c.benchmark_group("hit_path");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));

    group.bench_function("memory", |b| {
        b.to_async(&rt).iter_batched(
            request,
            |req| async {
                let (parts, body) = call(&memory, req).await;
                black_box((parts, body))
            },
            BatchSize::SmallInput,
        );
    });

    group.bench_function("redis", |b| {
        b.to_async(&rt).iter_batched(
            request,
            |req| async {
                let (parts, body) = call(&redis_svc, req).await;
                black_box((parts, body))
            },
            BatchSize::SmallInput,
        );
    });

    group.bench_function("redis_raw_get", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(raw_get(&pool, black_box(&key)).await) });
    });

    group.bench_function("redis_raw_get_pool_default", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(raw_get(&default_pool, black_box(&key)).await) });
    });

    group.finish();

    if criterion_filter_allows("hit_path/redis_vs_raw_get") {
        let ratio = rt.block_on(paired_ratio(&redis_svc, &pool, &key));
        eprintln!("{ratio}");
    }

    // The measured requests were hits. A Redis GET that outlasts the store
    // timeout (50 ms: a descheduled process on a loaded machine) bypasses
    // the cache for that one request; tolerate that for 0.1% of them, and
    // say so.
    for (what, before, after) in [
        ("memory", memory_before, memory_layer.stats()),
        ("redis", redis_before, layer.stats()),
    ] {
        let hits = after.hits - before.hits;
        let misses = after.misses - before.misses;
        let bypasses = after.bypasses - before.bypasses;
        let store_errors = after.store_errors - before.store_errors;
        let decode_errors = after.decode_errors - before.decode_errors;
        eprintln!(
            "hit_path/{what}: {hits} hits, {misses} misses, {bypasses} bypasses, \
             {store_errors} store errors, {decode_errors} decode errors while measuring"
        );
        if hits + misses + bypasses <= 1 {
            // Filtered out on the command line (the warm-up's check hit
            // only): nothing measured to check.
            continue;
        }
        assert_eq!(decode_errors, 0, "{what}: the entry stopped decoding");
        assert!(
            (misses + bypasses) * 1000 <= hits,
            "{what}: {} of {} requests were not hits: the figure is not a hit's",
            misses + bypasses,
            hits + misses + bypasses
        );
    }

    drop(rt);
    drop(process);
}

fn breaker_open(c: &mut Criterion) {
    let rt = runtime();
    let mut process = RedisProcess::start();
    let pool = rt.block_on(pool_without_checkout_test(&process));
    let layer = FenceLayer::builder()
        .store(RedisStore::new(pool))
        .breaker_cool_down(Duration::from_secs(3600))
        .build()
        .expect("valid layer");
    let svc = layer.layer(origin());
    process.stop();
    rt.block_on(async {
        for _ in 0..100 {
            if layer.stats().breaker_open {
                break;
            }
            let (parts, _) = call(&svc, request()).await;
            assert!(
                parts.status.is_success(),
                "the store's death fails no request"
            );
        }
    });
    assert!(
        layer.stats().breaker_open,
        "the breaker opened: {:?}",
        layer.stats()
    );
    let (parts, _) = rt.block_on(call(&svc, request()));
    assert!(
        cache_status(&parts).contains("detail=store-unavailable"),
        "{}",
        cache_status(&parts)
    );
    let bare = origin();
    let calls_before = layer.stats();

    let mut group = c.benchmark_group("breaker_open");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));
    group.bench_function("layer_store_down", |b| {
        b.to_async(&rt).iter_batched(
            request,
            |req| async {
                let (parts, body) = call(&svc, req).await;
                black_box((parts, body))
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("origin_alone", |b| {
        b.to_async(&rt).iter_batched(
            request,
            |req| async {
                let response = bare.clone().oneshot(req).await.expect("infallible");
                let body = response.into_body().collect().await.expect("full body");
                black_box(body.to_bytes())
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
    let after = layer.stats();
    eprintln!(
        "breaker_open: {} store calls skipped, {} store errors while measuring",
        after.store_skipped - calls_before.store_skipped,
        after.store_errors - calls_before.store_errors
    );
    assert!(after.breaker_open, "the breaker stayed open");
    assert_eq!(
        after.store_errors, calls_before.store_errors,
        "no store call was made while measuring"
    );
    drop(rt);
    drop(process);
}

criterion_group!(benches, hit_path, breaker_open);
criterion_main!(benches);
