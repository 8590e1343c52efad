//! Variant normalisation (`Vary`), against the real layer on the memory
//! store and on a real Redis: requests the origin cannot tell apart share
//! one variant, those it can get their own; each test counts the origin's
//! calls and compares bodies with what the origin made for that variant.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use support::RedisProcess;
use tower::{Layer, ServiceExt};
use tower_fence::store::MemoryStore;
use tower_fence::{FenceLayer, FenceLayerBuilder, FenceService};

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

/// `/enc` varies on `Accept-Encoding`, `/lang` on `Accept-Language`; each
/// answers with the value it got and its call number, so a body tells
/// which request made it and what that request said.
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
    /// The `Accept-Encoding` field lines of each request it got.
    encodings: Arc<Mutex<Vec<Vec<String>>>>,
}

impl Origin {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn router(&self) -> Router {
        fn echo(origin: &Origin, headers: &HeaderMap, name: &str) -> http::Response<Body> {
            let n = origin.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let got: Vec<String> = headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            let body = format!("{name}: {} (call {n})", got.join(" | "));
            http::Response::builder()
                .header("cache-control", "max-age=60")
                .header("vary", name)
                .body(Body::from(body))
                .unwrap()
        }
        async fn enc(State(origin): State<Origin>, headers: HeaderMap) -> http::Response<Body> {
            origin.encodings.lock().unwrap().push(
                headers
                    .get_all("accept-encoding")
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect(),
            );
            echo(&origin, &headers, "accept-encoding")
        }
        async fn lang(State(origin): State<Origin>, headers: HeaderMap) -> http::Response<Body> {
            echo(&origin, &headers, "accept-language")
        }
        Router::new()
            .route("/enc", get(enc))
            .route("/lang", get(lang))
            .with_state(self.clone())
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn is_hit(&self) -> bool {
        self.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("tower-fence; hit"))
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

async fn send(app: &FenceService<Router>, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(uri);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        app.clone().oneshot(req.body(Body::empty()).unwrap()),
    )
    .await
    .expect("a response within 10 s")
    .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn app(backend: &Backend, origin: &Origin) -> FenceService<Router> {
    backend
        .builder()
        .await
        .build()
        .unwrap()
        .layer(origin.router())
}

async fn language_lists_differing_in_spelling_share_a_variant(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    let first = send(&app, "/lang", &[("accept-language", "en, fr;q=0.5")]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.text(), "accept-language: en, fr;q=0.5 (call 1)");
    for same in ["en,fr;q=0.5", "EN , Fr ; q=0.50", "en;q=1, fr;q=0.500, en"] {
        let reply = send(&app, "/lang", &[("accept-language", same)]).await;
        assert!(reply.is_hit(), "{same}");
        assert_eq!(reply.body, first.body, "{same}");
    }
    // Another order or other weights are another preference: another
    // variant, made by the origin for it.
    let other = send(&app, "/lang", &[("accept-language", "fr;q=0.5, en")]).await;
    assert!(!other.is_hit());
    assert_eq!(other.text(), "accept-language: fr;q=0.5, en (call 2)");
    let weights = send(&app, "/lang", &[("accept-language", "en, fr;q=0.6")]).await;
    assert!(!weights.is_hit());
    assert_eq!(origin.calls(), 3);
}

async fn browser_encodings_fold_into_a_handful_of_variants(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    // What browsers and tools send, and the variant each folds into.
    let cases = [
        ("gzip, deflate, br, zstd", "br"),
        ("gzip, deflate, br", "br"),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", "br"),
        ("*", "br"),
        ("gzip, deflate", "gzip"),
        ("x-gzip", "gzip"),
        ("br;q=0, gzip", "gzip"),
        ("deflate", "identity"),
        ("identity", "identity"),
        ("", "identity"),
    ];
    let mut bodies = std::collections::HashMap::new();
    for (sent, variant) in cases {
        let reply = send(&app, "/enc", &[("accept-encoding", sent)]).await;
        assert_eq!(reply.status, StatusCode::OK);
        // The origin made the body for the normalised value.
        assert!(
            reply
                .text()
                .starts_with(&format!("accept-encoding: {variant} (")),
            "{sent:?} got {}",
            reply.text()
        );
        let first = bodies.entry(variant).or_insert_with(|| reply.body.clone());
        assert_eq!(&reply.body, first, "{sent:?}");
    }
    // One origin call per variant: br, gzip, identity.
    assert_eq!(origin.calls(), 3);
    // The origin only ever got the normalised value, one field line.
    for got in origin.encodings.lock().unwrap().iter() {
        assert_eq!(got.len(), 1);
        assert!(["br", "gzip", "identity"].contains(&got[0].as_str()));
    }
    // No Accept-Encoding is a variant of its own, and the origin gets none.
    let none = send(&app, "/enc", &[]).await;
    assert_eq!(none.text(), "accept-encoding:  (call 4)");
    let split = send(
        &app,
        "/enc",
        &[("accept-encoding", "gzip"), ("accept-encoding", "br")],
    )
    .await;
    assert!(split.is_hit());
    assert_eq!(split.body, bodies["br"]);
    assert_eq!(origin.calls(), 4);
}

async fn an_encoding_none_of_the_three_serves_keeps_its_members(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    let first = send(&app, "/enc", &[("accept-encoding", "zstd, identity;q=0")]).await;
    assert_eq!(first.text(), "accept-encoding: zstd, identity;q=0 (call 1)");
    let same = send(&app, "/enc", &[("accept-encoding", "ZSTD,identity; q=0")]).await;
    assert!(same.is_hit());
    assert_eq!(same.body, first.body);
    // Never served to a request that accepts identity.
    let identity = send(&app, "/enc", &[("accept-encoding", "zstd")]).await;
    assert!(!identity.is_hit());
    assert_eq!(identity.text(), "accept-encoding: identity (call 2)");
}

/// Each way a request reaches the origin (the leader of a miss, a refresh
/// behind a stale hit, a `HEAD` and a personal request that go alone)
/// carries the normalised `Accept-Encoding`; a hit never needs it.
async fn every_way_to_the_origin_carries_the_normalised_encoding(backend: Backend) {
    let origin = Origin::default();
    let clock = tower_fence::Clock::manual();
    let app = backend
        .builder()
        .await
        .clock(clock.clone())
        .grace(Duration::from_secs(600))
        .xfetch_beta(0.0)
        .build()
        .unwrap()
        .layer(origin.router());
    let browser = [("accept-encoding", "gzip, deflate, br, zstd")];
    let first = send(&app, "/enc", &browser).await;
    assert_eq!(first.text(), "accept-encoding: br (call 1)");
    let hit = send(&app, "/enc", &browser).await;
    assert!(hit.is_hit());
    assert_eq!(hit.body, first.body);
    assert_eq!(origin.calls(), 1);
    // Stale (max-age=60) but in grace: served, refreshed behind.
    clock.advance(Duration::from_secs(61));
    let stale = send(&app, "/enc", &[("accept-encoding", "br, gzip")]).await;
    assert_eq!(stale.body, first.body);
    for _ in 0..1000 {
        if origin.calls() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(origin.calls(), 2, "one refresh");
    let head = Request::head("/enc")
        .header("accept-encoding", "x-gzip")
        .body(Body::empty())
        .unwrap();
    let head = app.clone().oneshot(head).await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    let personal = send(
        &app,
        "/enc",
        &[
            ("accept-encoding", "GZIP;q=0.9"),
            ("authorization", "Bearer x"),
        ],
    )
    .await;
    assert_eq!(personal.text(), "accept-encoding: gzip (call 4)");
    let got = origin.encodings.lock().unwrap().clone();
    let want = [["br"], ["br"], ["gzip"], ["gzip"]];
    assert_eq!(got, want.map(|one| one.map(str::to_owned).to_vec()));
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
    language_lists_differing_in_spelling_share_a_variant,
    browser_encodings_fold_into_a_handful_of_variants,
    an_encoding_none_of_the_three_serves_keeps_its_members,
    every_way_to_the_origin_carries_the_normalised_encoding,
);
