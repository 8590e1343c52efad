//! A tonic service behind tower-fence: `Get` is cached, `Put` invalidates
//! it, `Watch` (server-streaming) passes through.
//!
//! Run with: cargo run --example tonic
//!
//! It caches in process memory; set `REDIS_URL` (e.g.
//! `REDIS_URL=redis://127.0.0.1:6379`) to cache in Redis instead. It serves
//! the `demo.Users` service (hand-written in `examples/tonic/proto.rs`, so
//! nothing needs `protoc`) on a loopback port, calls it with a tonic client
//! and prints what the cache did (`cache-status` in the response metadata).

#[path = "tonic/proto.rs"]
mod proto;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{GetRequest, PutRequest, User, UserStream, Users, UsersClient, UsersServer};
use tonic::{Request, Response, Status};
use tower_fence::policy::rules::Rule;
use tower_fence::FenceLayer;
use tracing_subscriber::EnvFilter;

/// A user store that is slow on purpose, as a database would be.
#[derive(Default)]
struct Db {
    version: AtomicU64,
}

impl Users for Arc<Db> {
    fn get(&self, request: Request<GetRequest>) -> proto::Answer<User> {
        let db = self.clone();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let id = request.into_inner().id;
            if id.is_empty() {
                return Err(Status::invalid_argument("no id"));
            }
            Ok(Response::new(User {
                name: format!("user {id}"),
                id,
                version: db.version.load(Ordering::SeqCst),
            }))
        })
    }

    fn put(&self, request: Request<PutRequest>) -> proto::Answer<User> {
        let db = self.clone();
        Box::pin(async move {
            let PutRequest { id, name } = request.into_inner();
            let version = db.version.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Response::new(User { id, name, version }))
        })
    }

    fn watch(&self, request: Request<GetRequest>) -> proto::Answer<UserStream> {
        Box::pin(async move {
            let id = request.into_inner().id;
            let users = (1..=3).map(move |version| {
                Ok(User {
                    id: id.clone(),
                    name: "watched".to_owned(),
                    version,
                })
            });
            let stream: UserStream = Box::pin(futures_util::stream::iter(users));
            Ok(Response::new(stream))
        })
    }
}

fn rules() -> [Rule; 2] {
    [
        // Cached for a minute, tagged by the user id the caller sends as
        // metadata.
        Rule::grpc("/demo.Users/Get")
            .ttl(Duration::from_secs(60))
            .header_param("id", "x-user-id")
            .tags(["user-{id}"]),
        // Its success invalidates that user's cached `Get` calls.
        Rule::grpc("/demo.Users/Put")
            .header_param("id", "x-user-id")
            .invalidate_tags(["user-{id}"]),
    ]
}

async fn layer() -> Result<FenceLayer, Box<dyn std::error::Error>> {
    let builder = FenceLayer::builder().rules(rules());
    match std::env::var("REDIS_URL") {
        Ok(url) => {
            let manager = bb8_redis::RedisConnectionManager::new(url.as_str())?;
            let pool = bb8::Pool::builder()
                .connection_timeout(Duration::from_secs(2))
                .build(manager)
                .await?;
            println!("caching in Redis at {url}");
            Ok(builder
                .store(tower_fence::store::RedisStore::new(pool))
                .build()?)
        }
        Err(_) => {
            println!("caching in memory (set REDIS_URL to cache in Redis)");
            Ok(builder.build()?)
        }
    }
}

fn with_id<T>(id: &str, message: T) -> Result<Request<T>, Box<dyn std::error::Error>> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("x-user-id", id.parse()?);
    Ok(request)
}

fn cache_status<T>(response: &Response<T>) -> String {
    response
        .metadata()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tonic::transport::Server::builder()
        .layer(layer().await?)
        .add_service(UsersServer::new(Arc::new(Db::default())))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let server = tokio::spawn(server);
    println!("serving demo.Users on {addr}");

    let mut client = UsersClient::connect(format!("http://{addr}")).await?;
    let get = |id: &str| with_id(id, GetRequest { id: id.to_owned() });
    for label in ["Get 42 (miss)", "Get 42 (hit)"] {
        let started = Instant::now();
        let response = client.get(get("42")?).await?;
        println!(
            "{label:<24} {:>8.1?}  version {}  cache-status: {}",
            started.elapsed(),
            response.get_ref().version,
            cache_status(&response)
        );
    }
    let put = client
        .put(with_id(
            "42",
            PutRequest {
                id: "42".into(),
                name: "renamed".into(),
            },
        )?)
        .await?;
    println!(
        "{:<24} {:>8}  version {}  cache-status: {}",
        "Put 42 (invalidates)",
        "",
        put.get_ref().version,
        cache_status(&put)
    );
    let started = Instant::now();
    let response = client.get(get("42")?).await?;
    println!(
        "{:<24} {:>8.1?}  version {}  cache-status: {}",
        "Get 42 (after the Put)",
        started.elapsed(),
        response.get_ref().version,
        cache_status(&response)
    );
    let response = client.watch(get("42")?).await?;
    let status = cache_status(&response);
    let mut stream = response.into_inner();
    let mut versions = Vec::new();
    while let Some(user) = stream.message().await? {
        versions.push(user.version);
    }
    println!(
        "{:<24} {:>8}  versions {versions:?}  cache-status: {status}",
        "Watch 42 (a stream)", ""
    );
    server.abort();
    Ok(())
}
