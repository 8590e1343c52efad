//! tonic services behind the layer, through a real tonic client over
//! loopback: chosen unary methods cached, everything else untouched.
//! Counts and behaviour only.

mod support;

#[path = "../examples/tonic/proto.rs"]
mod proto;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proto::{GetRequest, PutRequest, User, UserStream, Users, UsersClient, UsersServer};
use support::RedisProcess;
use tokio::sync::Notify;
use tonic::{Code, Request, Response, Status};
use tower::ServiceExt;
use tower_fence::policy::rules::Rule;
use tower_fence::{FenceLayer, FenceLayerBuilder};

const GET: &str = "/demo.Users/Get";
const PUT: &str = "/demo.Users/Put";
const WATCH: &str = "/demo.Users/Watch";

/// The service: counts calls per method; `Get` answers each id's current
/// version (`Put` bumps it), fails for the id `fail`, and waits at the gate
/// for ids starting with `gate`.
#[derive(Default)]
struct Fake {
    calls: Mutex<HashMap<&'static str, usize>>,
    versions: Mutex<HashMap<String, u64>>,
    gate: Notify,
    at_gate: AtomicUsize,
    serial: AtomicU64,
}

impl Fake {
    fn calls(&self, method: &str) -> usize {
        self.calls.lock().unwrap().get(method).copied().unwrap_or(0)
    }

    fn count(&self, method: &'static str) {
        *self.calls.lock().unwrap().entry(method).or_default() += 1;
    }

    fn version(&self, id: &str) -> u64 {
        self.versions.lock().unwrap().get(id).copied().unwrap_or(1)
    }
}

impl Users for Arc<Fake> {
    fn get(&self, request: Request<GetRequest>) -> proto::Answer<User> {
        let fake = self.clone();
        Box::pin(async move {
            fake.count(GET);
            let id = request.into_inner().id;
            if id.starts_with("gate") {
                let opened = fake.gate.notified();
                fake.at_gate.fetch_add(1, Ordering::SeqCst);
                opened.await;
            }
            if id.ends_with("fail") {
                return Err(Status::internal("boom"));
            }
            let version = fake.version(&id);
            Ok(Response::new(User {
                name: format!(
                    "user {id}, call {}",
                    fake.serial.fetch_add(1, Ordering::SeqCst)
                ),
                id,
                version,
            }))
        })
    }

    fn put(&self, request: Request<PutRequest>) -> proto::Answer<User> {
        let fake = self.clone();
        Box::pin(async move {
            fake.count(PUT);
            let PutRequest { id, name } = request.into_inner();
            let mut versions = fake.versions.lock().unwrap();
            let version = versions.entry(id.clone()).or_insert(1);
            *version += 1;
            Ok(Response::new(User {
                id,
                name,
                version: *version,
            }))
        })
    }

    fn watch(&self, request: Request<GetRequest>) -> proto::Answer<UserStream> {
        let fake = self.clone();
        Box::pin(async move {
            fake.count(WATCH);
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

/// Serves `fake` behind `layer` (none: bare) on a free loopback port.
async fn serve(fake: &Arc<Fake>, layer: Option<FenceLayer>, gzip: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut users = UsersServer::new(fake.clone());
    if gzip {
        users = users.gzip();
    }
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let builder = tonic::transport::Server::builder().max_concurrent_streams(Some(4096));
    match layer {
        Some(layer) => {
            let router = builder.layer(layer).add_service(users);
            tokio::spawn(router.serve_with_incoming(incoming));
        }
        None => {
            let mut builder = builder;
            let router = builder.add_service(users);
            tokio::spawn(router.serve_with_incoming(incoming));
        }
    }
    addr
}

async fn client(addr: SocketAddr) -> UsersClient {
    UsersClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn get(id: &str) -> Request<GetRequest> {
    Request::new(GetRequest { id: id.to_owned() })
}

fn cache_status<T>(response: &Response<T>) -> String {
    response
        .metadata()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Waits until `condition` holds; a bound on the wait, not on timing (the
/// counts decide): past it the test fails with `what` instead of hanging.
async fn until(mut condition: impl FnMut() -> bool, what: impl Fn() -> String) {
    let waited = tokio::time::timeout(Duration::from_secs(120), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    if waited.await.is_err() {
        panic!("never happened: {}", what());
    }
}

fn layer(rules: impl IntoIterator<Item = Rule>) -> FenceLayer {
    FenceLayer::builder().rules(rules).build().unwrap()
}

#[tokio::test]
async fn without_a_grpc_rule_calls_pass_untouched_and_are_no_writes() {
    let fake = Arc::new(Fake::default());
    // A catch-all HTTP rule does not name gRPC methods either.
    let layer = FenceLayer::builder()
        .rule(Rule::prefix("/").ttl(Duration::from_secs(60)))
        .build()
        .unwrap();
    let stats = layer.clone();
    let mut bare = client(serve(&fake, None, false).await).await;
    let mut fenced = client(serve(&fake, Some(layer), false).await).await;

    let direct = bare.get(get("1")).await.unwrap().into_inner();
    for n in 0..2 {
        let response = fenced.get(get("1")).await.unwrap();
        assert_eq!(
            cache_status(&response),
            "tower-fence; fwd=bypass; detail=method"
        );
        let user = response.into_inner();
        assert_eq!((user.id.as_str(), user.version), ("1", direct.version));
        assert_eq!(user.name, format!("user 1, call {}", n + 1));
    }
    let put = fenced
        .put(Request::new(PutRequest {
            id: "1".into(),
            name: "x".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.version, 2);
    let err = fenced.get(get("fail")).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    let mut stream = fenced.watch(get("w")).await.unwrap().into_inner();
    let mut versions = Vec::new();
    while let Some(user) = stream.message().await.unwrap() {
        versions.push(user.version);
    }
    assert_eq!(versions, [1, 2, 3]);

    assert_eq!(fake.calls(GET), 4);
    let stats = stats.stats();
    assert_eq!(
        (stats.hits, stats.stores, stats.invalidations),
        (0, 0, 0),
        "nothing cached, and a gRPC POST is no write"
    );
}

#[tokio::test]
async fn the_second_identical_call_is_a_hit_and_a_different_message_a_miss() {
    let fake = Arc::new(Fake::default());
    let rule = Rule::grpc(GET).ttl(Duration::from_secs(60));
    let mut client = client(serve(&fake, Some(layer([rule])), false).await).await;

    let first = client.get(get("1")).await.unwrap();
    assert_eq!(
        cache_status(&first),
        "tower-fence; fwd=uri-miss; fwd-status=200; stored"
    );
    let first = first.into_inner();
    // Per-call metadata is not in the key.
    let mut again = get("1");
    again.set_timeout(Duration::from_secs(7));
    again
        .metadata_mut()
        .insert("x-request-id", "abc".parse().unwrap());
    let second = client.get(again).await.unwrap();
    assert!(
        cache_status(&second).starts_with("tower-fence; hit; ttl="),
        "{}",
        cache_status(&second)
    );
    // The tonic client read the replayed trailers (it fails without a
    // `grpc-status`) and the same message.
    assert_eq!(second.into_inner(), first);
    assert_eq!(fake.calls(GET), 1);

    let other = client.get(get("2")).await.unwrap();
    assert!(cache_status(&other).contains("fwd=uri-miss"));
    assert_eq!(other.into_inner().id, "2");
    assert_eq!(fake.calls(GET), 2);
}

#[tokio::test]
async fn compressed_messages_are_keyed_and_replayed_as_they_came() {
    let fake = Arc::new(Fake::default());
    let rule = Rule::grpc(GET).ttl(Duration::from_secs(60));
    let addr = serve(&fake, Some(layer([rule])), true).await;
    let mut gzip = client(addr).await.gzip();
    let mut plain = client(addr).await;

    let first = gzip.get(get("1")).await.unwrap().into_inner();
    let hit = gzip.get(get("1")).await.unwrap();
    assert!(cache_status(&hit).contains("hit"), "{}", cache_status(&hit));
    assert_eq!(hit.metadata().get("grpc-encoding").unwrap(), "gzip");
    assert_eq!(hit.into_inner(), first);
    assert_eq!(fake.calls(GET), 1);

    // A client that sends and accepts no gzip is another key: it never
    // gets the compressed answer.
    let other = plain.get(get("1")).await.unwrap();
    assert!(cache_status(&other).contains("fwd=uri-miss"));
    assert!(other.metadata().get("grpc-encoding").is_none());
    assert_eq!(fake.calls(GET), 2);
    let hit = plain.get(get("1")).await.unwrap();
    assert!(cache_status(&hit).contains("hit"));
    assert_eq!(fake.calls(GET), 2);
}

#[tokio::test]
async fn an_error_status_is_never_cached_nor_given_to_waiters() {
    let fake = Arc::new(Fake::default());
    let rule = Rule::grpc(GET).ttl(Duration::from_secs(60));
    let layer = layer([rule]);
    let stats = layer.clone();
    let client = client(serve(&fake, Some(layer), false).await).await;

    let mut one = client.clone();
    for n in 1..=2 {
        let err = one.get(get("fail")).await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::Internal, "boom"));
        assert_eq!(fake.calls(GET), n);
    }

    // Ten concurrent calls behind one gated leader: its failure is its
    // own; each waiter calls the service itself, one at a time.
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.get(get("gate-fail")).await })
        })
        .collect();
    until(
        || fake.at_gate.load(Ordering::SeqCst) >= 1 && stats.stats().misses >= 12,
        || format!("all ten calls waiting: {:?}", stats.stats()),
    )
    .await;
    while !calls.iter().all(|c| c.is_finished()) {
        fake.gate.notify_waiters();
        tokio::task::yield_now().await;
    }
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err:?}");
    }
    assert_eq!(
        fake.calls(GET),
        12,
        "every caller got its own answer: none was handed another's error"
    );
    assert_eq!(stats.stats().stores, 0);
}

#[tokio::test]
async fn a_failure_in_the_trailers_is_never_stored() {
    // A hand-made gRPC service: one message, then `grpc-status: 13` in the
    // trailers (not trailers-only).
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let service = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "13".parse().unwrap());
            let frames = vec![
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(
                    b"\0\0\0\0\x01x",
                ))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let layer = layer([Rule::grpc("/t.T/Get").ttl(Duration::from_secs(60))]);
    let svc = tower::ServiceBuilder::new().layer(layer).service(service);
    let request = || {
        http::Request::post("/t.T/Get")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01a")))
            .unwrap()
    };
    for n in 1..=2 {
        let response = svc.clone().oneshot(request()).await.unwrap();
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "13");
        assert_eq!(calls.load(Ordering::SeqCst), n);
    }
}

#[tokio::test]
async fn streaming_calls_pass_through_even_when_named() {
    let fake = Arc::new(Fake::default());
    let rules = [
        Rule::grpc(WATCH).ttl(Duration::from_secs(60)),
        Rule::grpc(GET).ttl(Duration::from_secs(60)),
    ];
    let layer = layer(rules);
    let stats = layer.clone();
    let mut client = client(serve(&fake, Some(layer), false).await).await;
    for n in 1..=2 {
        let response = client.watch(get("w")).await.unwrap();
        let mut stream = response.into_inner();
        let mut versions = Vec::new();
        while let Some(user) = stream.message().await.unwrap() {
            versions.push(user.version);
        }
        assert_eq!(versions, [1, 2, 3]);
        assert_eq!(fake.calls(WATCH), n);
    }
    assert_eq!((stats.stats().stores, stats.stats().hits), (0, 0));
}

#[tokio::test]
async fn a_thousand_concurrent_identical_calls_reach_the_service_once() {
    let fake = Arc::new(Fake::default());
    let layer = layer([Rule::grpc(GET).ttl(Duration::from_secs(60))]);
    let stats = layer.clone();
    let addr = serve(&fake, Some(layer), false).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(client(addr).await);
    }
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let mut client = clients[i % 4].clone();
            tokio::spawn(async move { client.get(get("gate-1")).await })
        })
        .collect();
    // Every call reached the layer (and waits) before the leader answers.
    until(
        || fake.at_gate.load(Ordering::SeqCst) >= 1 && stats.stats().misses >= 1000,
        || format!("all calls waiting: {:?}", stats.stats()),
    )
    .await;
    fake.gate.notify_waiters();
    let mut names = std::collections::HashSet::new();
    for call in calls {
        names.insert(call.await.unwrap().unwrap().into_inner().name);
    }
    assert_eq!(names.len(), 1, "one answer for all");
    assert_eq!(fake.calls(GET), 1);
}

#[tokio::test]
async fn two_processes_on_redis_share_one_call() {
    let redis = RedisProcess::start_async().await;
    let fake = Arc::new(Fake::default());
    let mut layers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let layer = FenceLayerBuilder::default()
            .store(tower_fence::store::RedisStore::new(redis.pool().await))
            .rule(Rule::grpc(GET).ttl(Duration::from_secs(60)))
            // A thousand calls at once on a loaded debug build: no call
            // may fail open or give up waiting before the gate opens.
            .store_timeout(Duration::from_secs(10))
            .wait_timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        layers.push(layer.clone());
        // Behind one load balancer, both instances see one authority (it
        // is part of the key).
        let addr = serve(&fake, Some(layer), false).await;
        let channel = tonic::transport::Endpoint::new(format!("http://{addr}"))
            .unwrap()
            .origin("http://users.fleet".parse().unwrap())
            .connect()
            .await
            .unwrap();
        clients.push(UsersClient::new(channel));
    }
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let mut client = clients[i % 2].clone();
            tokio::spawn(async move { client.get(get("gate-r")).await })
        })
        .collect();
    until(
        || {
            fake.at_gate.load(Ordering::SeqCst) >= 1
                && layers.iter().map(|l| l.stats().misses).sum::<u64>() >= 1000
                && layers.iter().map(|l| l.stats().remote_waits).sum::<u64>() >= 1
        },
        || {
            format!(
                "all calls waiting: {:?}",
                layers.iter().map(|l| l.stats()).collect::<Vec<_>>()
            )
        },
    )
    .await;
    fake.gate.notify_waiters();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(fake.calls(GET), 1, "one call in the whole fleet");
}

#[tokio::test]
async fn put_invalidates_the_tag_taken_from_metadata() {
    let fake = Arc::new(Fake::default());
    let rules = [
        Rule::grpc(GET)
            .ttl(Duration::from_secs(60))
            .header_param("id", "x-user-id")
            .tags(["user-{id}"]),
        Rule::grpc(PUT)
            .header_param("id", "x-user-id")
            .invalidate_tags(["user-{id}"]),
    ];
    let mut client = client(serve(&fake, Some(layer(rules)), false).await).await;
    let with_id = |id: &str, mut request: Request<GetRequest>| {
        request
            .metadata_mut()
            .insert("x-user-id", id.parse().unwrap());
        request
    };

    assert_eq!(
        client
            .get(with_id("1", get("1")))
            .await
            .unwrap()
            .into_inner()
            .version,
        1
    );
    assert_eq!(
        client
            .get(with_id("2", get("2")))
            .await
            .unwrap()
            .into_inner()
            .version,
        1
    );
    let hit = client.get(with_id("1", get("1"))).await.unwrap();
    assert!(cache_status(&hit).contains("hit"));
    assert_eq!(fake.calls(GET), 2);

    let mut put = Request::new(PutRequest {
        id: "1".into(),
        name: "new".into(),
    });
    put.metadata_mut().insert("x-user-id", "1".parse().unwrap());
    client.put(put).await.unwrap();

    let after = client.get(with_id("1", get("1"))).await.unwrap();
    assert!(cache_status(&after).contains("fwd=uri-miss"));
    assert_eq!(after.into_inner().version, 2, "the write is read");
    assert_eq!(fake.calls(GET), 3);
    // Another user's entry is untouched.
    let other = client.get(with_id("2", get("2"))).await.unwrap();
    assert!(cache_status(&other).contains("hit"));

    // Without the metadata the call is not cached (its entry could not be
    // found by its tag).
    let bare = client.get(get("1")).await.unwrap();
    assert_eq!(
        cache_status(&bare),
        "tower-fence; fwd=bypass; detail=param-missing"
    );
}

#[tokio::test]
async fn put_invalidates_a_whole_method() {
    let fake = Arc::new(Fake::default());
    let rules = [
        Rule::grpc(GET).ttl(Duration::from_secs(60)),
        Rule::grpc(PUT).invalidate([GET]),
    ];
    let mut client = client(serve(&fake, Some(layer(rules)), false).await).await;
    for id in ["1", "2", "1", "2"] {
        client.get(get(id)).await.unwrap();
    }
    assert_eq!(fake.calls(GET), 2);
    client
        .put(Request::new(PutRequest {
            id: "1".into(),
            name: "new".into(),
        }))
        .await
        .unwrap();
    let one = client.get(get("1")).await.unwrap().into_inner();
    client.get(get("2")).await.unwrap();
    assert_eq!(one.version, 2);
    assert_eq!(fake.calls(GET), 4, "every cached Get was invalidated");
}

#[tokio::test]
async fn grpc_web_is_passed_through() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let service = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("content-type", "application/grpc-web+proto")
                    .header("grpc-status", "0")
                    .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01x")))
                    .unwrap(),
            )
        }
    });
    let layer = layer([Rule::grpc("/t.T/Get").ttl(Duration::from_secs(60))]);
    let svc = tower::ServiceBuilder::new().layer(layer).service(service);
    for (n, ct) in ["application/grpc-web+proto", "application/grpc-web-text"]
        .iter()
        .enumerate()
    {
        let request = http::Request::post("/t.T/Get")
            .header("content-type", *ct)
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01a")))
            .unwrap();
        let response = svc.clone().oneshot(request).await.unwrap();
        assert_eq!(
            response.headers()["cache-status"],
            "tower-fence; fwd=bypass; detail=grpc-web"
        );
        assert_eq!(calls.load(Ordering::SeqCst), n + 1);
    }
}
