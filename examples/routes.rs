//! Route rules: how each route of an axum app is cached.
//!
//! Run with: cargo run --example routes
//!
//! One `FenceLayer` with rules covers the whole router; a second style, a
//! layer per route (`MethodRouter::layer`, `route_layer`), shares the same
//! store when the routes get clones of one layer. The example serves on
//! 127.0.0.1:3001 (or `LISTEN`) and prints what to try:
//!
//! ```text
//! curl -i localhost:3001/users/42          # cached 30 s, tagged user-42
//! curl -i -X PUT localhost:3001/users/42   # clears /users/42 and the /users list
//! curl -i localhost:3001/feed -H 'x-tenant: a'   # one entry per tenant
//! curl -i localhost:3001/admin/stats       # never cached
//! curl -i localhost:3001/report            # per-route layer, same store
//! curl -i -X PURGE -H "authorization: Bearer $SECRET" localhost:3001/_purge/users/42
//! curl -i -X PURGE -H "authorization: Bearer $SECRET" -H "purge-tag: user-42" localhost:3001/_purge/
//! ```
//!
//! The purge endpoint (`tower_fence::purge::PurgeService`) is mounted beside
//! the cached routes, outside the layer; its secret is `PURGE_SECRET`, or a
//! random one the example prints.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tower_fence::policy::rules::Rule;
use tower_fence::purge::PurgeService;
use tower_fence::FenceLayer;
use tracing_subscriber::EnvFilter;

async fn user(Path(id): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(200)).await;
    format!("user {id}\n")
}

async fn update_user(Path(_id): Path<u64>) -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn users() -> &'static str {
    "all users\n"
}

async fn feed() -> &'static str {
    "the feed\n"
}

async fn admin() -> &'static str {
    "admin stats (never cached)\n"
}

async fn report() -> &'static str {
    "a report, cached by a per-route layer\n"
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let secret =
        std::env::var("PURGE_SECRET").unwrap_or_else(|_| format!("{:032x}", fastrand::u128(..)));

    let layer = FenceLayer::builder()
        // Nothing is cached unless a rule (or the response) says so.
        .default_ttl(Duration::ZERO)
        .rule(
            Rule::path("/users/{id}")
                .ttl(Duration::from_secs(30))
                .grace(Duration::from_secs(10))
                .tags(["user-{id}"])
                // A write on a user also clears the collection.
                .invalidate(["/users"]),
        )
        .rule(Rule::path("/users").ttl(Duration::from_secs(10)))
        .rule(
            Rule::path("/feed")
                .ttl(Duration::from_secs(5))
                .key_header("x-tenant"),
        )
        .rule(Rule::prefix("/admin").off())
        .rule(Rule::path("/report").ttl(Duration::from_secs(60)))
        .build()?;

    let app = Router::new()
        .route("/users/{id}", get(user).put(update_user))
        .route("/users", get(users))
        .route("/feed", get(feed))
        .route("/admin/stats", get(admin))
        .layer(layer.clone())
        // The per-route style: a clone of the same layer, so the same store
        // and the same invalidator.
        .route("/report", get(report).layer(layer.clone()))
        // Added after `.layer(..)`: the purge endpoint itself is not cached.
        .nest_service("/_purge", PurgeService::new(layer.invalidator(), &secret)?);

    let addr = std::env::var("LISTEN")
        .ok()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3001)));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    println!(
        "try: curl -i http://{addr}/users/42   (twice), then curl -i -X PUT http://{addr}/users/42"
    );
    println!("purge secret: {secret}");
    axum::serve(listener, app).await?;
    Ok(())
}
