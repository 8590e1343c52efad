//! Hits in a loop, for counting instructions per hit: a figure that, unlike
//! wall time, a noisy machine does not move.
//!
//! Run with:
//!
//! ```sh
//! cargo build --release --example hit_loop
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/hit_loop 10000
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/hit_loop 30000
//! ```
//!
//! and divide the difference of the two "Collected" counts by 20,000: the
//! instructions of one hit through the whole service (clone, `oneshot`,
//! collect a 1 KiB body), without the start-up.
//!
//! The mode after the count picks what the loop does:
//!
//! - `memory` (the default): hits on the in-memory store;
//! - `bare`: the same loop calls the origin without the layer: the
//!   difference between the two figures is what the layer itself costs a
//!   hit;
//! - `redis`: hits on a `RedisStore` at `REDIS_URL` (required: a
//!   `redis-server` of your own, such as `redis://127.0.0.1:PORT`), on a
//!   pool that does not `PING` on checkout;
//! - `raw`: a bare `GET` of the same record through the same pool, no
//!   layer: the floor a Redis hit is measured against (the `hit_path`
//!   bench's `redis_raw_get`).
//!
//! The `redis` and `raw` modes write their entry first (one miss through
//! the layer) and check that the loop's requests were hits, or that the
//! `GET`s found the record.

use std::convert::Infallible;
use std::time::Duration;

use bb8_redis::{bb8, redis, RedisConnectionManager};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use tower::{Layer, ServiceExt};
use tower_fence::store::RedisStore;
use tower_fence::FenceLayer;

/// The one path every request asks for.
const PATH: &str = "/users/42";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hits: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 100_000,
    };
    let mode = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "memory".to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let origin = tower::service_fn(|_req: Request<Empty<Bytes>>| async {
            let response = Response::builder()
                .header("cache-control", "max-age=3600")
                .body(Full::new(Bytes::from(vec![b'x'; 1024])));
            Ok::<_, Infallible>(response.unwrap_or_default())
        });
        let request = || Request::get(PATH).body(Empty::new());
        // No early refresh: every request is the same plain hit.
        let builder = FenceLayer::builder().xfetch_beta(0.0);
        // One pool for the layer's store and the raw `GET`s, as in the
        // `hit_path` bench.
        let pool = match mode.as_str() {
            "redis" | "raw" => Some(pool().await?),
            _ => None,
        };
        let layer = match (mode.as_str(), &pool) {
            ("bare", _) => {
                for _ in 0..=hits {
                    let response = origin.oneshot(request()?).await?;
                    response.into_body().collect().await?;
                }
                return Ok(());
            }
            ("memory", _) => builder.build()?,
            ("redis" | "raw", Some(pool)) => {
                builder.store(RedisStore::new(pool.clone())).build()?
            }
            (other, _) => {
                return Err(format!("unknown mode {other:?}: memory|bare|redis|raw").into())
            }
        };
        let svc = layer.layer(origin);
        if let Some(pool) = &pool {
            // The layer writes its entry in the background: ask until a
            // raw `GET` finds it.
            let key = layer.cache_key(&request()?);
            let mut stored = false;
            for _ in 0..200 {
                svc.clone().oneshot(request()?).await?;
                if raw_get(pool, &key).await?.is_some() {
                    stored = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !stored {
                return Err("the layer never stored its entry".into());
            }
            if mode == "raw" {
                for _ in 0..=hits {
                    if raw_get(pool, &key).await?.is_none() {
                        return Err("the record went missing".into());
                    }
                }
                return Ok(());
            }
        }
        let before = layer.stats();
        for _ in 0..=hits {
            let response = svc.clone().oneshot(request()?).await?;
            response.into_body().collect().await?;
        }
        let after = layer.stats();
        // The memory store's first request is its miss; the rest are hits.
        if after.hits - before.hits < hits as u64 {
            return Err(format!("only {} hits of {hits}", after.hits - before.hits).into());
        }
        Ok(())
    })
}

/// A pool on `REDIS_URL` that does not `PING` on checkout.
async fn pool() -> Result<bb8::Pool<RedisConnectionManager>, Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").map_err(|_| {
        "the redis and raw modes need REDIS_URL: a redis-server of your own, \
         such as redis://127.0.0.1:PORT"
    })?;
    let manager = RedisConnectionManager::new(url)?;
    Ok(bb8::Pool::builder()
        .max_size(4)
        .test_on_check_out(false)
        .build(manager)
        .await?)
}

/// `GET key` through `pool`: check out, query, check in.
async fn raw_get(
    pool: &bb8::Pool<RedisConnectionManager>,
    key: &str,
) -> Result<Option<Vec<u8>>, Box<dyn std::error::Error>> {
    let mut conn = pool.get().await?;
    Ok(redis::cmd("GET").arg(key).query_async(&mut *conn).await?)
}
