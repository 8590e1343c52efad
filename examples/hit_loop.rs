//! Memory-store hits in a loop, for counting instructions per hit: a figure
//! that, unlike wall time, a noisy machine does not move.
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
//! With `bare` after the count (`hit_loop 10000 bare`) the same loop calls
//! the origin without the layer: the difference between the two figures is
//! what the layer itself costs a hit.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use tower::{Layer, ServiceExt};
use tower_fence::FenceLayer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hits: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 100_000,
    };
    let bare = std::env::args().nth(2).as_deref() == Some("bare");
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
        // No early refresh: every request is the same plain hit.
        let svc = FenceLayer::builder()
            .xfetch_beta(0.0)
            .build()?
            .layer(origin);
        for _ in 0..=hits {
            let request = Request::get("/users/42").body(Empty::new())?;
            if bare {
                let response = origin.oneshot(request).await?;
                response.into_body().collect().await?;
            } else {
                let response = svc.clone().oneshot(request).await?;
                response.into_body().collect().await?;
            }
        }
        Ok(())
    })
}
