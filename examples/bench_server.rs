//! An axum server for load tests of cache hits: `GET /1k` and `GET /64k`
//! return precomputed bytes (fresh for an hour), served one of four ways:
//!
//! - `bare`: no layer, the handler returns the bytes: the upper bound a hit
//!   can reach;
//! - `memory`: tower-fence on its in-memory store;
//! - `redis`: tower-fence on Redis (`REDIS_URL`, default
//!   `redis://127.0.0.1:6379`);
//! - `tiered`: tower-fence on Redis with a local tier (64 MiB, 2 s).
//!
//! Run with:
//!
//! ```sh
//! cargo run --release --example bench_server -- memory 127.0.0.1:3000
//! wrk -t2 -c64 -d10s --latency http://127.0.0.1:3000/1k
//! ```
//!
//! The first request of each route is a miss; the server makes it itself
//! before it listens, so a run measures hits only. `benches/wrk.sh` runs
//! all four in one go, server and client pinned to their own cores, and
//! prints each mode's ratio to `bare` (the README's "Hits under load").

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::header::CACHE_CONTROL;
use http::Request;
use tower::ServiceExt;
use tower_fence::FenceLayer;

fn app(mode: &str) -> Router {
    let small = Bytes::from(vec![b'x'; 1024]);
    let large = Bytes::from(vec![b'y'; 64 * 1024]);
    Router::new()
        .route(
            "/1k",
            get(move || {
                let body = small.clone();
                async move { ([(CACHE_CONTROL, "max-age=3600")], body) }
            }),
        )
        .route(
            "/64k",
            get(move || {
                let body = large.clone();
                async move { ([(CACHE_CONTROL, "max-age=3600")], body) }
            }),
        )
        .route(
            "/mode",
            get({
                let mode = mode.to_owned();
                move || {
                    let mode = mode.clone();
                    async move { mode }
                }
            }),
        )
}

async fn layer(mode: &str) -> Result<Option<FenceLayer>, Box<dyn std::error::Error>> {
    let redis_pool = || async {
        let url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let manager = bb8_redis::RedisConnectionManager::new(url)?;
        let pool = bb8::Pool::builder().max_size(8).build(manager).await?;
        Ok::<_, Box<dyn std::error::Error>>(pool)
    };
    // No early refresh: every request of a run is the same plain hit.
    let layer = match mode {
        "bare" => return Ok(None),
        "memory" => FenceLayer::builder().xfetch_beta(0.0).build()?,
        "redis" => FenceLayer::builder()
            .redis(redis_pool().await?)
            .xfetch_beta(0.0)
            .build()?,
        "tiered" => FenceLayer::builder()
            .redis(redis_pool().await?)
            .local_tier(64 * 1024 * 1024, Duration::from_secs(2))
            .xfetch_beta(0.0)
            .build()?,
        other => return Err(format!("unknown mode {other:?}: bare|memory|redis|tiered").into()),
    };
    Ok(Some(layer))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "memory".to_owned());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let app = match layer(&mode).await? {
        None => app(&mode),
        Some(layer) => app(&mode).layer(layer),
    };
    // Warm both routes: the first request is a miss that fills; a second
    // one is read back (for the local tier, it keeps the copy).
    for path in ["/1k", "/64k", "/1k", "/64k"] {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(axum::body::Body::empty())?)
            .await?;
        let status = response
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(no layer)")
            .to_owned();
        axum::body::to_bytes(response.into_body(), usize::MAX).await?;
        eprintln!("warm {path}: {status}");
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bench_server ({mode}) on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
