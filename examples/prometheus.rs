//! The layer's metrics, scraped by Prometheus.
//!
//! Run with: cargo run --example prometheus --features metrics
//!
//! An axum app with a cached route behind tower-fence, and `/metrics` in
//! the Prometheus text format from `metrics-exporter-prometheus`. The
//! example sends a few requests through the cache itself, prints what
//! `/metrics` then says, and serves on 127.0.0.1:3002 (or `LISTEN`) until
//! Ctrl-C; with `--once` it stops after printing. Set `REDIS_URL` to cache
//! in Redis.
//!
//! ```text
//! curl -s localhost:3002/metrics | grep tower_fence
//! ```
//!
//! The names and labels are listed in `tower_fence::metrics`; labels stay
//! low-cardinality (the route rule's pattern, never the raw path).

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use http::Request;
use http_body_util::BodyExt;
use metrics_exporter_prometheus::PrometheusBuilder;
use tower::ServiceExt;
use tower_fence::policy::rules::Rule;
use tower_fence::FenceLayer;

async fn product(Path(id): Path<u32>) -> String {
    tokio::time::sleep(Duration::from_millis(20)).await;
    format!("product {id}\n")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let once = std::env::args().any(|a| a == "--once");
    // The recorder first: the layer reports to whatever is installed.
    let metrics = PrometheusBuilder::new().install_recorder()?;

    let mut builder =
        FenceLayer::builder().rule(Rule::path("/products/{id}").ttl(Duration::from_secs(30)));
    if let Ok(url) = std::env::var("REDIS_URL") {
        let manager = bb8_redis::RedisConnectionManager::new(url)?;
        builder = builder.redis(bb8::Pool::builder().build(manager).await?);
    }
    let layer = builder.build()?;

    let scrape = metrics.clone();
    let app = Router::new()
        .route(
            "/products/{id}",
            get(product).post(|| async { http::StatusCode::NO_CONTENT }),
        )
        .layer(layer)
        // Added after `.layer(..)`: `/metrics` itself is never cached.
        .route("/metrics", get(move || std::future::ready(scrape.render())));

    // A miss, two hits, another miss, a write that invalidates.
    for (method, path) in [
        ("GET", "/products/1"),
        ("GET", "/products/1"),
        ("GET", "/products/1"),
        ("GET", "/products/2"),
        ("POST", "/products/1"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())?;
        let response = app.clone().oneshot(request).await?;
        let status = response
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        response.into_body().collect().await?;
        println!("{method} {path}: {status}");
    }
    println!("\n/metrics (tower_fence_* lines):");
    for line in metrics.render().lines() {
        if line.starts_with("tower_fence") {
            println!("{line}");
        }
    }
    if once {
        return Ok(());
    }

    let addr = std::env::var("LISTEN")
        .ok()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3002)));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("\nlistening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
