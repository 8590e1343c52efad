//! The caching behaviour suite: every test runs against the memory store and
//! against a real Redis started for it.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use support::RedisProcess;
use tower::ServiceExt;
use tower_fence::policy::rules::Rule;
use tower_fence::store::{MemoryStore, RedisStore};
use tower_fence::{FenceLayer, FenceLayerBuilder};

/// Where a test's entries live.
struct Backend {
    redis: Option<RedisProcess>,
}

impl Backend {
    fn memory() -> Self {
        Backend { redis: None }
    }

    async fn redis() -> Self {
        Backend {
            redis: Some(RedisProcess::start_async().await),
        }
    }

    async fn builder(&self) -> FenceLayerBuilder {
        match &self.redis {
            None => FenceLayer::builder().store(MemoryStore::new(8 << 20)),
            Some(redis) => FenceLayer::builder().redis(redis.pool().await),
        }
    }
}

/// An origin whose behaviour the query string picks:
/// `cc=` Cache-Control, `cookie` a Set-Cookie, `vary=` Vary, `status=`,
/// `size=N` an N-byte body (else `call N`), `me` a body naming the request's
/// `Cookie` and `X-Api-Key` (a page personalised by session), `badcc` the
/// `Cache-Control` `private, x="é"` (not visible ASCII).
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
}

impl Origin {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn router(&self) -> Router {
        async fn handler(
            State(origin): State<Origin>,
            Path(_path): Path<String>,
            RawQuery(query): RawQuery,
            request_headers: HeaderMap,
        ) -> http::Response<Body> {
            let n = origin.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let mut response = http::Response::builder();
            let mut body = format!("call {n}").into_bytes();
            for pair in query.as_deref().unwrap_or("").split('&') {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                let value = value
                    .replace("%3D", "=")
                    .replace("%20", " ")
                    .replace("%2C", ",");
                response = match name {
                    "cc" => response.header("cache-control", value),
                    "cookie" => response.header("set-cookie", "session=abc"),
                    "vary" => response.header("vary", value),
                    "status" => response.status(value.parse::<u16>().unwrap()),
                    "size" => {
                        body = vec![b'x'; value.parse().unwrap()];
                        response
                    }
                    "me" => {
                        let named = |name: &str| {
                            request_headers
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default()
                        };
                        body = format!(
                            "page of {}{} (call {n})",
                            named("cookie"),
                            named("x-api-key")
                        )
                        .into_bytes();
                        response
                    }
                    "badcc" => response.header(
                        "cache-control",
                        http::HeaderValue::from_bytes("private, x=\"é\"".as_bytes()).unwrap(),
                    ),
                    _ => response,
                };
            }
            response.body(Body::from(body)).unwrap()
        }

        async fn trailers(State(origin): State<Origin>) -> http::Response<Body> {
            origin.calls.fetch_add(1, Ordering::SeqCst);
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames = vec![
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(
                    b"part1,",
                ))),
                Ok(http_body::Frame::data(Bytes::from_static(b"part2"))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = Frames(frames.into_iter().map(|f| f.unwrap()).collect());
            http::Response::builder()
                .header("cache-control", "max-age=60")
                .body(Body::new(body))
                .unwrap()
        }

        Router::new()
            .route("/trailers", get(trailers))
            .route("/{*path}", get(handler).post(handler))
            .with_state(self.clone())
    }
}

/// A body that yields prepared frames (data, then trailers).
struct Frames(std::collections::VecDeque<http_body::Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Reply {
    fn cache_status(&self) -> String {
        self.headers
            .get_all("cache-status")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn is_hit(&self) -> bool {
        self.cache_status().starts_with("tower-fence; hit")
    }
}

async fn send(app: &Router, req: Request<Body>) -> Reply {
    let response = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(req))
        .await
        .expect("response within 10 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

async fn get_path(app: &Router, uri: &str) -> Reply {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

/// Waits until the background fill of the last miss is in the store.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::memory()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::redis().await).await;
                }
            )*
        }
    };
}

on_both_stores!(
    second_get_is_a_hit,
    head_is_answered_from_the_get_entry,
    unsafe_methods_pass_through,
    private_cookie_and_no_store_are_not_stored,
    large_bodies_stream_through_unstored,
    every_route_shares_one_store,
    query_and_key_headers_separate_entries,
    entries_expire,
    garbage_records_are_misses_and_deleted,
    inner_errors_pass_through,
    trailers_are_cached,
    variants_are_stored_side_by_side,
    authorization_is_shared_only_with_permission,
    status_codes_follow_the_configuration,
    cookie_requests_never_get_another_users_page,
    credential_headers_and_rules_decide_sharing,
    unparseable_cache_control_is_not_shared,
    a_record_copied_under_another_key_is_not_served,
    records_of_a_newer_codec_are_misses_but_kept,
);

async fn second_get_is_a_hit(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());

    let first = get_path(&app, "/users/1?cc=max-age%3D60").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.cache_status(),
        "tower-fence; fwd=uri-miss; fwd-status=200; stored"
    );
    assert!(first.headers.get("age").is_none());
    settle().await;
    let second = get_path(&app, "/users/1?cc=max-age%3D60").await;
    assert!(second.is_hit(), "{}", second.cache_status());
    assert!(second.cache_status().contains("ttl="));
    assert_eq!(second.headers["age"], "0");
    assert_eq!(second.headers["cache-control"], "max-age=60");
    assert_eq!(second.body, first.body);
    assert_eq!(origin.calls(), 1);
    let stats = layer.stats();
    assert_eq!((stats.hits, stats.misses, stats.stores), (1, 1, 1));
}

async fn head_is_answered_from_the_get_entry(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    let get = get_path(&app, "/h?cc=max-age%3D60").await;
    settle().await;
    let head = send(
        &app,
        Request::head("/h?cc=max-age%3D60")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(head.is_hit(), "{}", head.cache_status());
    assert!(head.body.is_empty());
    assert_eq!(head.headers["content-length"], get.body.len().to_string());
    assert_eq!(origin.calls(), 1);
}

async fn unsafe_methods_pass_through(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    for _ in 0..2 {
        let reply = send(
            &app,
            Request::post("/p?cc=max-age%3D60")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(
            reply.cache_status(),
            "tower-fence; fwd=bypass; detail=method"
        );
    }
    assert_eq!(origin.calls(), 2);
    assert_eq!(layer.stats().bypasses, 2);
}

async fn private_cookie_and_no_store_are_not_stored(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    let cases = [
        ("/a?cc=private%2C%20max-age%3D60", "private"),
        ("/b?cc=max-age%3D60&cookie", "set-cookie"),
        ("/c?cc=no-store", "no-store"),
    ];
    for (uri, detail) in cases {
        for _ in 0..2 {
            let reply = get_path(&app, uri).await;
            assert_eq!(
                reply.cache_status(),
                format!("tower-fence; fwd=uri-miss; fwd-status=200; detail={detail}")
            );
            settle().await;
        }
    }
    assert_eq!(origin.calls(), 6);
}

async fn large_bodies_stream_through_unstored(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.max_body_size(1000).build().unwrap());
    for _ in 0..2 {
        let reply = get_path(&app, "/big?cc=max-age%3D60&size=5000").await;
        assert_eq!(reply.body.len(), 5000);
        assert!(reply.cache_status().contains("detail=too-large"));
        settle().await;
    }
    let small = get_path(&app, "/small?cc=max-age%3D60&size=1000").await;
    assert!(small.cache_status().contains("stored"));
    settle().await;
    assert!(get_path(&app, "/small?cc=max-age%3D60&size=1000")
        .await
        .is_hit());
    assert_eq!(origin.calls(), 3);
}

async fn every_route_shares_one_store(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    // `Router::layer` calls `Layer::layer` once per route.
    let app = Router::new()
        .route("/one", get(|| async { "one" }))
        .route("/two", get(|| async { "two" }))
        .merge(origin.router())
        .layer(layer.clone());
    for uri in ["/one", "/two", "/three"] {
        get_path(&app, uri).await;
    }
    settle().await;
    for uri in ["/one", "/two", "/three"] {
        assert!(get_path(&app, uri).await.is_hit(), "{uri}");
    }
    let stats = layer.stats();
    assert_eq!((stats.misses, stats.hits, stats.stores), (3, 3, 3));
}

async fn query_and_key_headers_separate_entries(backend: Backend) {
    let origin = Origin::default();
    let app = origin.router().layer(
        backend
            .builder()
            .await
            .key_header("x-tenant")
            .build()
            .unwrap(),
    );
    let req = |uri: &str, tenant: &str| {
        Request::get(uri)
            .header("x-tenant", tenant)
            .body(Body::empty())
            .unwrap()
    };
    let a = send(&app, req("/q?v=1", "a")).await;
    let b = send(&app, req("/q?v=2", "a")).await;
    let c = send(&app, req("/q?v=1", "b")).await;
    settle().await;
    assert_eq!(origin.calls(), 3);
    assert_eq!(send(&app, req("/q?v=1", "a")).await.body, a.body);
    assert_eq!(send(&app, req("/q?v=2", "a")).await.body, b.body);
    assert_eq!(send(&app, req("/q?v=1", "b")).await.body, c.body);
    assert_eq!(origin.calls(), 3);
}

async fn entries_expire(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    get_path(&app, "/e?cc=max-age%3D1").await;
    settle().await;
    assert!(get_path(&app, "/e?cc=max-age%3D1").await.is_hit());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = get_path(&app, "/e?cc=max-age%3D1").await;
    assert!(
        after.cache_status().starts_with("tower-fence; fwd="),
        "{}",
        after.cache_status()
    );
    assert_eq!(origin.calls(), 2);
}

async fn garbage_records_are_misses_and_deleted(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    let uri = "/g?cc=max-age%3D60";
    get_path(&app, uri).await;
    settle().await;
    let key = layer.cache_key(&Request::get(uri).body(()).unwrap());
    assert!(key.starts_with("tf:/g#{"), "{key}");
    assert!(layer.store().get(&key).await.unwrap().is_some());
    layer
        .store()
        .put(
            &key,
            Bytes::from_static(b"not an entry"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let reply = get_path(&app, uri).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.cache_status().contains("fwd=uri-miss"),
        "{}",
        reply.cache_status()
    );
    assert_eq!(layer.stats().decode_errors, 1);
    settle().await;
    // The refill replaced the garbage with a real entry.
    assert!(get_path(&app, uri).await.is_hit());
    assert_eq!(origin.calls(), 2);
    if let Some(redis) = &backend.redis {
        assert_eq!(redis.keys_matching("tf:/g#*").await, vec![key]);
    }
}

async fn inner_errors_pass_through(backend: Backend) {
    let layer = backend.builder().await.build().unwrap();
    let failing = tower::service_fn(|_req: Request<Body>| async {
        Err::<http::Response<Body>, _>(std::io::Error::other("origin down"))
    });
    let svc = tower::Layer::layer(&layer, failing);
    let err = svc
        .oneshot(Request::get("/x").body(Body::empty()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "origin down");
}

async fn trailers_are_cached(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    let first = get_path(&app, "/trailers").await;
    assert_eq!(first.body, "part1,part2");
    assert_eq!(first.trailers.as_ref().unwrap()["grpc-status"], "0");
    settle().await;
    let second = get_path(&app, "/trailers").await;
    assert!(second.is_hit(), "{}", second.cache_status());
    assert_eq!(second.body, "part1,part2");
    assert_eq!(second.trailers.as_ref().unwrap()["grpc-status"], "0");
    assert_eq!(origin.calls(), 1);
}

async fn variants_are_stored_side_by_side(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    let req = |lang: &str| {
        Request::get("/v?cc=max-age%3D60&vary=accept-language")
            .header("accept-language", lang)
            .body(Body::empty())
            .unwrap()
    };
    let en = send(&app, req("en")).await;
    settle().await;
    assert!(send(&app, req("en")).await.is_hit());
    let de = send(&app, req("de")).await;
    assert!(
        de.cache_status().contains("fwd=vary-miss"),
        "{}",
        de.cache_status()
    );
    assert_ne!(de.body, en.body);
    assert_eq!(origin.calls(), 2);
    // Both variants are kept, each served to its own requests.
    settle().await;
    let en_again = send(&app, req("en")).await;
    let de_again = send(&app, req("de")).await;
    assert!(en_again.is_hit() && de_again.is_hit());
    assert_eq!((en_again.body, de_again.body), (en.body, de.body));
    assert_eq!(origin.calls(), 2);
}

async fn authorization_is_shared_only_with_permission(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    let authorized = |uri: &str| {
        Request::get(uri)
            .header("authorization", "Bearer t")
            .body(Body::empty())
            .unwrap()
    };
    // RFC 9111 §3.5: not stored without public, s-maxage or must-revalidate.
    for _ in 0..2 {
        let reply = send(&app, authorized("/secret?cc=max-age%3D60")).await;
        assert_eq!(
            reply.cache_status(),
            "tower-fence; fwd=uri-miss; fwd-status=200; detail=authorization"
        );
    }
    assert_eq!(origin.calls(), 2);
    // With `public` it is.
    send(&app, authorized("/open?cc=public%2C%20max-age%3D60")).await;
    settle().await;
    assert!(send(&app, authorized("/open?cc=public%2C%20max-age%3D60"))
        .await
        .is_hit());
    assert_eq!(origin.calls(), 3);
    // An entry stored for anonymous requests without `public` is not given
    // to a request with credentials.
    get_path(&app, "/anon?cc=max-age%3D60").await;
    settle().await;
    assert!(get_path(&app, "/anon?cc=max-age%3D60").await.is_hit());
    let reply = send(&app, authorized("/anon?cc=max-age%3D60")).await;
    assert!(
        reply.cache_status().contains("fwd=request"),
        "{}",
        reply.cache_status()
    );
    assert_eq!(origin.calls(), 5);
}

async fn status_codes_follow_the_configuration(backend: Backend) {
    let origin = Origin::default();
    let app = origin.router().layer(
        backend
            .builder()
            .await
            .cacheable_statuses([StatusCode::OK])
            .build()
            .unwrap(),
    );
    // 404 is not in the configured set and states no freshness: not stored.
    get_path(&app, "/s?status=404").await;
    settle().await;
    assert!(!get_path(&app, "/s?status=404").await.is_hit());
    // With explicit freshness, any final status may be stored.
    get_path(&app, "/s?status=404&cc=max-age%3D60").await;
    settle().await;
    assert!(get_path(&app, "/s?status=404&cc=max-age%3D60")
        .await
        .is_hit());
    // 500 with the default TTL is not stored.
    get_path(&app, "/s?status=500").await;
    settle().await;
    assert!(!get_path(&app, "/s?status=500").await.is_hit());
    assert_eq!(origin.calls(), 5);
}

/// A request carrying `cookie`.
fn with_cookie(uri: &str, cookie: &str) -> Request<Body> {
    Request::get(uri)
        .header("cookie", cookie)
        .body(Body::empty())
        .unwrap()
}

async fn cookie_requests_never_get_another_users_page(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    // No Cache-Control: the page may depend on the session, so it is
    // neither stored nor given to the next user.
    let alice = send(&app, with_cookie("/me?me", "session=alice")).await;
    assert_eq!(alice.body, "page of session=alice (call 1)");
    assert_eq!(
        alice.cache_status(),
        "tower-fence; fwd=uri-miss; fwd-status=200; detail=cookie"
    );
    settle().await;
    let bob = send(&app, with_cookie("/me?me", "session=bob")).await;
    assert_eq!(bob.body, "page of session=bob (call 2)");
    assert!(!bob.is_hit(), "{}", bob.cache_status());
    settle().await;
    // Nor to an anonymous request.
    let anonymous = get_path(&app, "/me?me").await;
    assert_eq!(anonymous.body, "page of  (call 3)");
    assert_eq!(origin.calls(), 3);

    // A response that says it may be shared is.
    let public = "/public?me&cc=public%2C%20max-age%3D60";
    let alice = send(&app, with_cookie(public, "session=alice")).await;
    assert!(
        alice.cache_status().contains("stored"),
        "{}",
        alice.cache_status()
    );
    settle().await;
    let bob = send(&app, with_cookie(public, "session=bob")).await;
    assert!(bob.is_hit(), "{}", bob.cache_status());
    assert_eq!(bob.body, alice.body);
    assert!(get_path(&app, public).await.is_hit());
    assert_eq!(origin.calls(), 4);

    // An entry stored for anonymous requests without `public` is not given
    // to a request with a cookie (whose page may differ).
    let anonymous_only = "/anon?me&cc=max-age%3D60";
    get_path(&app, anonymous_only).await;
    settle().await;
    assert!(get_path(&app, anonymous_only).await.is_hit());
    let bob = send(&app, with_cookie(anonymous_only, "session=bob")).await;
    assert_eq!(bob.body, "page of session=bob (call 6)");
    assert!(
        bob.cache_status().contains("fwd=request"),
        "{}",
        bob.cache_status()
    );
    assert_eq!(origin.calls(), 6);
}

async fn credential_headers_and_rules_decide_sharing(backend: Backend) {
    let origin = Origin::default();
    let layer = backend
        .builder()
        .await
        .credential_header("x-api-key")
        .rule(Rule::prefix("/keyed").key_cookie("session"))
        .rule(Rule::prefix("/static").share_cookies())
        .build()
        .unwrap();
    let app = origin.router().layer(layer);

    // A rule keyed by the session cookie: each session its own copy.
    for (session, call) in [("alice", 1), ("bob", 2)] {
        for _ in 0..2 {
            let reply = send(
                &app,
                with_cookie("/keyed?me", &format!("theme=dark; session={session}")),
            )
            .await;
            assert_eq!(
                reply.body,
                format!("page of theme=dark; session={session} (call {call})")
            );
            settle().await;
        }
    }
    let alice = send(&app, with_cookie("/keyed?me", "session=alice")).await;
    assert!(alice.is_hit(), "{}", alice.cache_status());
    assert_eq!(alice.body, "page of theme=dark; session=alice (call 1)");
    assert_eq!(origin.calls(), 2);

    // A rule that shares cookies: one copy for everyone.
    let first = send(&app, with_cookie("/static/app.css?me", "session=alice")).await;
    settle().await;
    let second = send(&app, with_cookie("/static/app.css?me", "session=bob")).await;
    assert!(second.is_hit(), "{}", second.cache_status());
    assert_eq!(second.body, first.body);
    assert_eq!(origin.calls(), 3);

    // A configured credential header is a cookie: not shared by default.
    let with_key = |key: &str| {
        Request::get("/api?me")
            .header("x-api-key", key)
            .body(Body::empty())
            .unwrap()
    };
    let one = send(&app, with_key("one")).await;
    assert_eq!(one.body, "page of one (call 4)");
    assert!(one.cache_status().contains("detail=cookie"));
    settle().await;
    let two = send(&app, with_key("two")).await;
    assert_eq!(two.body, "page of two (call 5)");
    assert_eq!(origin.calls(), 5);
}

async fn unparseable_cache_control_is_not_shared(backend: Backend) {
    let origin = Origin::default();
    let app = origin
        .router()
        .layer(backend.builder().await.build().unwrap());
    // `private, x="é"`: one byte that is not visible ASCII.
    for n in 1..=2 {
        let reply = get_path(&app, "/bad?badcc").await;
        assert_eq!(reply.body, format!("call {n}"));
        assert_eq!(
            reply.cache_status(),
            "tower-fence; fwd=uri-miss; fwd-status=200; detail=cache-control"
        );
        settle().await;
    }
    assert_eq!(origin.calls(), 2);
}

async fn a_record_copied_under_another_key_is_not_served(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    let key = |uri: &str| layer.cache_key(&Request::get(uri).body(()).unwrap());
    let (first, second) = ("/first?cc=max-age%3D60", "/second?cc=max-age%3D60");
    assert_eq!(get_path(&app, first).await.body, "call 1");
    assert_eq!(get_path(&app, second).await.body, "call 2");
    settle().await;
    // A buggy job copies the first record over the second.
    match &backend.redis {
        Some(redis) => {
            let mut conn = redis.conn().await;
            let copied: i64 = ::redis::cmd("COPY")
                .arg(key(first))
                .arg(key(second))
                .arg("REPLACE")
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(copied, 1);
        }
        None => {
            let record = layer.store().get(&key(first)).await.unwrap().unwrap();
            layer
                .store()
                .put(&key(second), record, Duration::from_secs(60))
                .await
                .unwrap();
        }
    }
    assert_eq!(
        layer.store().get(&key(first)).await.unwrap(),
        layer.store().get(&key(second)).await.unwrap()
    );
    let reply = get_path(&app, second).await;
    assert_eq!(reply.body, "call 3");
    assert!(
        reply.cache_status().contains("fwd=uri-miss"),
        "{}",
        reply.cache_status()
    );
    assert_eq!(layer.stats().decode_errors, 1);
    // The first record is still served under its own key.
    let reply = get_path(&app, first).await;
    assert!(reply.is_hit(), "{}", reply.cache_status());
    assert_eq!(reply.body, "call 1");
    assert_eq!(origin.calls(), 3);
}

async fn records_of_a_newer_codec_are_misses_but_kept(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.build().unwrap();
    let app = origin.router().layer(layer.clone());
    let key = |uri: &str| layer.cache_key(&Request::get(uri).body(()).unwrap());
    // Entry magic, then a codec version: 255 is newer than any this build
    // knows (a newer instance wrote it during a rolling deploy), 1 is
    // retired. The rest does not matter: the version is read first.
    let (newer, retired) = ("/newer?cc=no-store", "/retired?cc=no-store");
    let put = |uri: &'static str, version: u8| {
        let store = layer.store().clone();
        let key = key(uri);
        async move {
            let mut record = b"TF".to_vec();
            record.push(version);
            record.extend_from_slice(&[0; 64]);
            store
                .put(&key, Bytes::from(record), Duration::from_secs(60))
                .await
                .unwrap();
        }
    };
    put(newer, 255).await;
    put(retired, 1).await;
    for uri in [newer, retired] {
        let reply = get_path(&app, uri).await;
        assert!(
            reply.cache_status().contains("fwd=uri-miss"),
            "{uri}: {}",
            reply.cache_status()
        );
    }
    settle().await;
    assert_eq!(origin.calls(), 2);
    // The newer record is left for the instances that read it; the retired
    // one is deleted as any record that does not decode.
    assert!(layer.store().get(&key(newer)).await.unwrap().is_some());
    assert!(layer.store().get(&key(retired)).await.unwrap().is_none());
    assert_eq!(layer.stats().decode_errors, 1);
}

#[tokio::test]
async fn redis_hit_is_one_get_and_no_ping() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let store = RedisStore::new(redis.pool().await);
    let app = origin
        .router()
        .layer(FenceLayer::builder().store(store).build().unwrap());
    get_path(&app, "/one-trip?cc=max-age%3D60").await;
    settle().await;
    redis.reset_stats().await;
    for _ in 0..10 {
        assert!(get_path(&app, "/one-trip?cc=max-age%3D60").await.is_hit());
    }
    assert_eq!(redis.command_calls("get").await, 10);
    assert_eq!(redis.command_calls("ping").await, 0);
    assert_eq!(origin.calls(), 1);
}

#[tokio::test]
async fn redis_down_fails_open_and_recovers() {
    let mut redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let layer = FenceLayer::builder()
        .redis(redis.pool().await)
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    get_path(&app, "/f?cc=max-age%3D60").await;
    settle().await;
    assert!(get_path(&app, "/f?cc=max-age%3D60").await.is_hit());

    redis.stop();
    for _ in 0..3 {
        let reply = get_path(&app, "/f?cc=max-age%3D60").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            reply
                .cache_status()
                .starts_with("tower-fence; fwd=bypass; fwd-status=200; detail=store-"),
            "{}",
            reply.cache_status()
        );
    }
    assert!(layer.stats().store_errors >= 3);

    redis.restart();
    let mut recovered = false;
    for _ in 0..50 {
        let reply = get_path(&app, "/f?cc=max-age%3D60").await;
        settle().await;
        if reply.is_hit() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the cache works again once Redis is back");
}

#[tokio::test]
async fn paused_redis_times_out_into_a_pass_through() {
    let redis = RedisProcess::start_async().await;
    let origin = Origin::default();
    let layer = FenceLayer::builder()
        .redis(redis.pool().await)
        .store_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let app = origin.router().layer(layer.clone());
    get_path(&app, "/t?cc=max-age%3D60").await;
    settle().await;
    redis.pause();
    let reply = get_path(&app, "/t?cc=max-age%3D60").await;
    redis.resume();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.cache_status(),
        "tower-fence; fwd=bypass; fwd-status=200; detail=store-timeout"
    );
    assert_eq!(origin.calls(), 2);
}

#[tokio::test]
async fn the_default_layer_caches_in_memory() {
    let origin = Origin::default();
    let app = origin.router().layer(FenceLayer::memory());
    get_path(&app, "/m").await;
    settle().await;
    assert!(get_path(&app, "/m").await.is_hit());
    assert_eq!(origin.calls(), 1);
}

/// Heuristic freshness (RFC 9111 §4.2.2) is opt-in: a response with only a
/// `Last-Modified` 10,000 s old is fresh for 10 % of that, capped at 600 s;
/// without the option (and no default TTL) it is not stored.
#[tokio::test]
async fn heuristic_freshness_comes_from_last_modified_only_when_asked() {
    let calls = Arc::new(AtomicUsize::new(0));
    let origin = {
        let calls = calls.clone();
        tower::service_fn(move |_req: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                let now = std::time::SystemTime::now();
                let modified = httpdate::fmt_http_date(now - Duration::from_secs(10_000));
                let response = http::Response::builder()
                    .header("date", httpdate::fmt_http_date(now))
                    .header("last-modified", modified)
                    .body(Body::from("page"))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    for (heuristic, hits) in [(false, false), (true, true)] {
        calls.store(0, Ordering::SeqCst);
        let mut builder = FenceLayer::builder().default_ttl(Duration::ZERO);
        if heuristic {
            builder = builder.heuristic_freshness(0.1, Duration::from_secs(600));
        }
        let svc = tower::ServiceBuilder::new()
            .layer(builder.build().unwrap())
            .service(origin.clone());
        let mut last = String::new();
        for _ in 0..2 {
            let response = svc
                .clone()
                .oneshot(Request::get("/doc").body(Body::empty()).unwrap())
                .await
                .unwrap();
            last = response.headers()["cache-status"]
                .to_str()
                .unwrap()
                .to_owned();
        }
        assert_eq!(last.contains("hit"), hits, "heuristic {heuristic}: {last}");
        if hits {
            // 600 s at most (the cap), give or take the second it took.
            assert!(
                last.contains("ttl=599") || last.contains("ttl=600"),
                "{last}"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), if hits { 1 } else { 2 });
    }
    assert!(FenceLayer::builder()
        .heuristic_freshness(1.5, Duration::from_secs(1))
        .build()
        .is_err());
}

/// The inner service, counting its clones.
struct Counted<S> {
    inner: S,
    clones: Arc<AtomicUsize>,
}

impl<S: Clone> Clone for Counted<S> {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Counted {
            inner: self.inner.clone(),
            clones: self.clones.clone(),
        }
    }
}

impl<S: tower::Service<R>, R> tower::Service<R> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> S::Future {
        self.inner.call(req)
    }
}

/// A hit the memory store answers at once leaves the readied inner service
/// in place: tower's clone-and-swap happens only for a request that calls
/// it (an axum route's clone is an allocation).
#[tokio::test]
async fn a_memory_hit_does_not_clone_the_inner_service() {
    use tower::{Layer, Service};
    let origin = Origin::default();
    let clones = Arc::new(AtomicUsize::new(0));
    let mut svc = FenceLayer::memory().layer(Counted {
        inner: origin.router(),
        clones: clones.clone(),
    });
    // A plain entry, then one that varies (a hit there is two lookups).
    for uri in ["/counted", "/counted?cc=max-age%3D60&vary=accept-language"] {
        for round in 0..5 {
            let request = Request::get(uri)
                .header("accept-language", "en")
                .body(Body::empty())
                .unwrap();
            let ready = ServiceExt::<Request<Body>>::ready(&mut svc).await.unwrap();
            let response = ready.call(request).await.unwrap();
            let hit = response
                .headers()
                .get("cache-status")
                .is_some_and(|v| v.to_str().unwrap().starts_with("tower-fence; hit"));
            response.into_body().collect().await.unwrap();
            assert_eq!(hit, round > 0, "{uri}: round {round}");
            settle().await;
        }
    }
    assert_eq!(origin.calls(), 2);
    assert_eq!(clones.load(Ordering::SeqCst), 2, "only the misses took it");
}
