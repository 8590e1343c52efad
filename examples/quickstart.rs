//! An axum app with a deliberately slow handler, cached by tower-fence.
//!
//! Run with: cargo run --example quickstart
//!
//! It caches in process memory; set `REDIS_URL` (e.g.
//! `REDIS_URL=redis://127.0.0.1:6379`) to cache in Redis instead. It prints
//! the URL to try; the first request takes half a second, the second is a
//! hit (look at the `cache-status` header with `curl -i`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use tower_fence::FenceLayer;
use tracing_subscriber::EnvFilter;

/// A handler that is slow on purpose, as a database query would be.
async fn user(Path(id): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(500)).await;
    format!("user {id}, built at {:?}\n", std::time::SystemTime::now())
}

async fn layer() -> Result<FenceLayer, Box<dyn std::error::Error>> {
    match std::env::var("REDIS_URL") {
        Ok(url) => {
            let manager = bb8_redis::RedisConnectionManager::new(url.as_str())?;
            let pool = bb8::Pool::builder()
                .connection_timeout(Duration::from_secs(2))
                .build(manager)
                .await?;
            println!("caching in Redis at {url}");
            Ok(FenceLayer::new(pool))
        }
        Err(_) => {
            println!("caching in memory (set REDIS_URL to cache in Redis)");
            Ok(FenceLayer::memory())
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let app = Router::new()
        .route("/users/{id}", get(user))
        .layer(layer().await?);

    let addr = std::env::var("LISTEN")
        .ok()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3000)));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    println!("try: curl -i http://{addr}/users/42   (twice: the second is a hit)");
    tokio::spawn(demo(addr));
    axum::serve(listener, app).await?;
    Ok(())
}

/// Asks the server for the same URL twice and prints what the cache did.
async fn demo(addr: SocketAddr) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let url = format!("http://{addr}/users/42");
    for attempt in ["first ", "second"] {
        let Ok(uri) = url.parse::<http::Uri>() else {
            return;
        };
        let started = std::time::Instant::now();
        match client.get(uri).await {
            Ok(response) => {
                let status = response
                    .headers()
                    .get("cache-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let _ = response.into_body().collect().await;
                println!(
                    "{attempt} GET {url}: {:>8.2?}  cache-status: {status}",
                    started.elapsed()
                );
            }
            Err(err) => {
                println!("{attempt} GET {url} failed: {err}");
                return;
            }
        }
    }
}
