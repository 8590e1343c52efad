//! Route rules: per-route TTLs, key parts, tags, invalidation targets, off;
//! and per-route layers sharing one store.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_fence::policy::rules::Rule;
use tower_fence::FenceLayer;

#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

impl Counter {
    fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Every route answers `call N`; `/max/{x}` says `max-age=600`, `/cookie`
/// sets a cookie, `/lang` varies on `Accept-Language`.
fn app(counter: &Counter) -> Router {
    async fn plain(State(c): State<Counter>) -> String {
        format!("call {}", c.next())
    }
    async fn max_age(State(c): State<Counter>, Path(_): Path<String>) -> http::Response<Body> {
        http::Response::builder()
            .header("cache-control", "max-age=600")
            .body(Body::from(format!("call {}", c.next())))
            .unwrap()
    }
    async fn cookie(State(c): State<Counter>) -> http::Response<Body> {
        http::Response::builder()
            .header("set-cookie", "session=secret")
            .body(Body::from(format!("call {}", c.next())))
            .unwrap()
    }
    async fn lang(State(c): State<Counter>, headers: HeaderMap) -> http::Response<Body> {
        let lang = headers
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        http::Response::builder()
            .header("vary", "accept-language")
            .body(Body::from(format!("{lang} call {}", c.next())))
            .unwrap()
    }
    async fn write(State(c): State<Counter>) -> StatusCode {
        c.next();
        StatusCode::NO_CONTENT
    }
    Router::new()
        .route("/users", get(plain))
        .route("/users/{id}", get(plain).put(write))
        .route("/counters/{id}", get(plain).post(write))
        .route("/admin/{*rest}", get(plain))
        .route("/feed", get(plain))
        .route("/prefs", get(plain))
        .route("/tenant", get(plain))
        .route("/me", get(plain))
        .route("/max/{x}", get(max_age))
        .route("/cookie", get(cookie))
        .route("/lang", get(lang))
        .with_state(counter.clone())
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }
    fn is_hit(&self) -> bool {
        self.cache_status().starts_with("tower-fence; hit")
    }
}

async fn send(app: &Router, req: Request<Body>) -> Reply {
    let response = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(req))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn get_req(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn with_header(uri: &str, name: &str, value: &str) -> Request<Body> {
    Request::get(uri)
        .header(name, value)
        .body(Body::empty())
        .unwrap()
}

/// A layer that caches nothing by default: only what rules allow.
fn builder() -> tower_fence::FenceLayerBuilder {
    FenceLayer::builder().default_ttl(Duration::ZERO)
}

#[tokio::test]
async fn a_route_ttl_applies_where_the_response_states_none() {
    let counter = Counter::default();
    let app = app(&counter).layer(
        builder()
            .rule(Rule::path("/users/{id}").ttl(Duration::from_secs(30)))
            .build()
            .unwrap(),
    );
    send(&app, get_req("/users/1")).await;
    let hit = send(&app, get_req("/users/1")).await;
    assert!(hit.is_hit(), "{}", hit.cache_status());
    assert!(hit.cache_status().contains("ttl=29") || hit.cache_status().contains("ttl=30"));
    // Other routes keep the layer's default (0: not stored).
    send(&app, get_req("/users")).await;
    assert!(!send(&app, get_req("/users")).await.is_hit());
    assert_eq!(counter.get(), 3);
}

#[tokio::test]
async fn override_ttl_wins_over_the_response() {
    let counter = Counter::default();
    let app = app(&counter).layer(
        builder()
            .rule(Rule::path("/max/{x}").override_ttl(Duration::from_secs(2)))
            .build()
            .unwrap(),
    );
    send(&app, get_req("/max/a")).await;
    let hit = send(&app, get_req("/max/a")).await;
    assert!(hit.cache_status().contains("ttl=1") || hit.cache_status().contains("ttl=2"));
}

#[tokio::test]
async fn off_routes_bypass_the_cache() {
    let counter = Counter::default();
    let app = app(&counter).layer(
        FenceLayer::builder()
            .rule(Rule::prefix("/admin").off())
            .build()
            .unwrap(),
    );
    for _ in 0..2 {
        let reply = send(&app, get_req("/admin/panel")).await;
        assert_eq!(
            reply.cache_status(),
            "tower-fence; fwd=bypass; detail=rule-off"
        );
    }
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn key_parts_from_headers_cookies_and_extensions() {
    #[derive(Clone, Hash)]
    struct Tenant(u32);

    let counter = Counter::default();
    let layer = builder()
        .rule(
            Rule::path("/feed")
                .ttl(Duration::from_secs(60))
                .key_header("x-tenant"),
        )
        .rule(
            Rule::path("/prefs")
                .ttl(Duration::from_secs(60))
                .key_cookie("lang"),
        )
        .rule(
            Rule::path("/tenant")
                .ttl(Duration::from_secs(60))
                .key_extension::<Tenant>(),
        )
        .build()
        .unwrap();
    // The app sets the tenant from a header before the cache sees the request.
    let app = app(&counter)
        .layer(layer)
        .layer(tower::util::MapRequestLayer::new(
            |mut req: Request<Body>| {
                let tenant = req
                    .headers()
                    .get("x-tenant-id")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                if let Some(id) = tenant {
                    req.extensions_mut().insert(Tenant(id));
                }
                req
            },
        ));
    let a = send(&app, with_header("/feed", "x-tenant", "a")).await;
    let b = send(&app, with_header("/feed", "x-tenant", "b")).await;
    assert_ne!(a.body, b.body);
    assert_eq!(
        send(&app, with_header("/feed", "x-tenant", "a")).await.body,
        a.body
    );

    let en = send(&app, with_header("/prefs", "cookie", "x=1; lang=en")).await;
    let de = send(&app, with_header("/prefs", "cookie", "lang=de")).await;
    assert_ne!(en.body, de.body);
    let en_again = send(&app, with_header("/prefs", "cookie", "lang=en; y=2")).await;
    assert!(en_again.is_hit());
    assert_eq!(en_again.body, en.body);

    let t1 = send(&app, with_header("/tenant", "x-tenant-id", "1")).await;
    let t2 = send(&app, with_header("/tenant", "x-tenant-id", "2")).await;
    assert_ne!(t1.body, t2.body);
    assert!(send(&app, with_header("/tenant", "x-tenant-id", "1"))
        .await
        .is_hit());
    // Without the extension the route is not cached at all.
    let none = send(&app, get_req("/tenant")).await;
    assert_eq!(
        none.cache_status(),
        "tower-fence; fwd=bypass; detail=extension-missing"
    );
}

#[tokio::test]
async fn route_tags_and_invalidation_targets() {
    let counter = Counter::default();
    let layer = builder()
        .rule(
            Rule::path("/users/{id}")
                .ttl(Duration::from_secs(60))
                .tags(["user-{id}"])
                .invalidate(["/users"]),
        )
        .rule(Rule::path("/users").ttl(Duration::from_secs(60)))
        .rule(
            Rule::path("/counters/{id}")
                .ttl(Duration::from_secs(60))
                .no_invalidation(),
        )
        .build()
        .unwrap();
    let app = app(&counter).layer(layer.clone());
    for uri in ["/users/42", "/users/7", "/users", "/counters/1"] {
        send(&app, get_req(uri)).await;
        assert!(send(&app, get_req(uri)).await.is_hit(), "{uri}");
    }
    // A tag with the route's parameter.
    layer.invalidator().invalidate_tag("user-42").await.unwrap();
    assert!(!send(&app, get_req("/users/42")).await.is_hit());
    assert!(send(&app, get_req("/users/7")).await.is_hit());
    // A write on /users/7 also clears the parent collection.
    let put = Request::put("/users/7").body(Body::empty()).unwrap();
    assert_eq!(send(&app, put).await.status, StatusCode::NO_CONTENT);
    assert!(!send(&app, get_req("/users/7")).await.is_hit());
    assert!(!send(&app, get_req("/users")).await.is_hit());
    // A route whose writes invalidate nothing.
    let post = Request::builder()
        .method(Method::POST)
        .uri("/counters/1")
        .body(Body::empty())
        .unwrap();
    send(&app, post).await;
    assert!(send(&app, get_req("/counters/1")).await.is_hit());
}

#[tokio::test]
async fn set_cookie_is_stripped_where_a_rule_says_so() {
    let counter = Counter::default();
    let app = app(&counter).layer(
        builder()
            .rule(
                Rule::path("/cookie")
                    .ttl(Duration::from_secs(60))
                    .strip_set_cookie(),
            )
            .build()
            .unwrap(),
    );
    let first = send(&app, get_req("/cookie")).await;
    assert!(first.headers.get("set-cookie").is_none());
    let second = send(&app, get_req("/cookie")).await;
    assert!(second.is_hit());
    assert!(second.headers.get("set-cookie").is_none());
}

#[tokio::test]
async fn credentials_can_key_a_route() {
    let counter = Counter::default();
    let app = app(&counter).layer(
        builder()
            .rule(
                Rule::path("/me")
                    .ttl(Duration::from_secs(60))
                    .authorization(true),
            )
            .build()
            .unwrap(),
    );
    let alice = send(&app, with_header("/me", "authorization", "Bearer alice")).await;
    let bob = send(&app, with_header("/me", "authorization", "Bearer bob")).await;
    assert_ne!(alice.body, bob.body);
    let alice_again = send(&app, with_header("/me", "authorization", "Bearer alice")).await;
    assert!(alice_again.is_hit());
    assert_eq!(alice_again.body, alice.body);
    // Without credentials: its own entry, never someone else's.
    let anonymous = send(&app, get_req("/me")).await;
    assert_ne!(anonymous.body, alice.body);
    assert_ne!(anonymous.body, bob.body);
}

#[tokio::test]
async fn declared_vary_headers_key_the_variants() {
    let counter = Counter::default();
    let app = app(&counter).layer(
        builder()
            .rule(
                Rule::path("/lang")
                    .ttl(Duration::from_secs(60))
                    .vary(["accept-language"]),
            )
            .build()
            .unwrap(),
    );
    let en = send(&app, with_header("/lang", "accept-language", "en")).await;
    let de = send(&app, with_header("/lang", "accept-language", "de")).await;
    assert!(en.body.starts_with(b"en") && de.body.starts_with(b"de"));
    let en_again = send(&app, with_header("/lang", "accept-language", "en")).await;
    let de_again = send(&app, with_header("/lang", "accept-language", "de")).await;
    assert!(en_again.is_hit() && de_again.is_hit());
    assert_eq!((en_again.body, de_again.body), (en.body, de.body));
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn per_route_layers_share_one_store() {
    let counter = Counter::default();
    let layer = FenceLayer::builder().build().unwrap();
    async fn plain(State(c): State<Counter>) -> String {
        format!("call {}", c.next())
    }
    async fn write(State(c): State<Counter>) -> StatusCode {
        c.next();
        StatusCode::NO_CONTENT
    }
    // One route with `MethodRouter::layer`, others with `route_layer`
    // (which leaves unmatched requests alone), both from one layer.
    let cached_b = Router::new()
        .route("/b", get(plain))
        .route("/c", post(write))
        .route_layer(layer.clone());
    let app = Router::new()
        .route("/a", get(plain).layer(layer.clone()))
        .merge(cached_b)
        .with_state(counter.clone());
    for uri in ["/a", "/b"] {
        send(&app, get_req(uri)).await;
        assert!(send(&app, get_req(uri)).await.is_hit(), "{uri}");
    }
    // One store: the invalidator of the shared layer sees both routes.
    layer.invalidator().invalidate_prefix("/").await.unwrap();
    assert!(!send(&app, get_req("/a")).await.is_hit());
    assert!(!send(&app, get_req("/b")).await.is_hit());
}

#[tokio::test]
async fn invalid_rules_are_configuration_errors() {
    for rule in [
        Rule::path("/files/{*rest}/more"),
        Rule::path("/users/{id"),
        Rule::path("no-leading-slash"),
        Rule::path("/users/{id}").tags(["user-{name}"]),
    ] {
        assert!(FenceLayer::builder().rule(rule).build().is_err());
    }
}

/// `cache_key` and `Invalidator::invalidate_request` use the route's key
/// parts: the entry a tenant's request is served from is the one removed.
#[tokio::test]
async fn invalidate_request_uses_the_rules_key_parts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        move |headers: HeaderMap| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let tenant = headers
                    .get("x-tenant")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                format!("for {tenant}")
            }
        }
    };
    let layer = FenceLayer::builder()
        .rule(Rule::path("/report").key_header("x-tenant"))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/report", get(handler))
        .layer(layer.clone());
    let request = |tenant: &str| {
        Request::get("/report")
            .header("x-tenant", tenant)
            .body(Body::empty())
            .unwrap()
    };
    assert_ne!(
        layer.cache_key(&request("a")),
        layer.cache_key(&request("b"))
    );
    for tenant in ["a", "b", "a", "b"] {
        let response = app.clone().oneshot(request(tenant)).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, Bytes::from(format!("for {tenant}")));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let removed = layer
        .invalidator()
        .invalidate_request(&request("a"))
        .await
        .unwrap();
    assert!(removed >= 1);
    for tenant in ["a", "b"] {
        app.clone().oneshot(request(tenant)).await.unwrap();
    }
    // Tenant a's entry went; tenant b's stayed.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}
