//! Property tests through the whole layer (memory store, no Redis): a
//! `Cache-Control` or `CDN-Cache-Control` that does not parse is never more
//! cacheable than none, and `FenceLayer::cache_key` of arbitrary request
//! parts. The unit property tests of the codec, key derivation and parser
//! sit beside them (`src/entry.rs`, `src/key.rs`,
//! `src/policy/cache_control.rs`); the fuzz targets in `fuzz/` check the
//! same properties for longer.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use http::header::{HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::{service_fn, ServiceExt};
use tower_fence::fuzzing::{self, CacheControl};
use tower_fence::store::KeyPattern;
use tower_fence::{FenceLayer, CACHE_STATUS, DEFAULT_NAMESPACE};

/// Bytes `http` accepts as a header value: junk, or directives (some known,
/// some not) between separators.
fn field_line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..16),
        "((no-store|private|public|no-cache|max-age|s-maxage|x-ext|[a-z]{1,3})(=[0-9a-z\"]{1,4})?[ ,;]{0,2}){0,3}"
            .prop_map(String::into_bytes),
    ]
    .prop_filter("a header value", |b| HeaderValue::from_bytes(b).is_ok())
}

fn field() -> impl Strategy<Value = Option<Vec<Vec<u8>>>> {
    proptest::option::of(proptest::collection::vec(field_line(), 1..3))
}

fn append(headers: &mut HeaderMap, name: &HeaderName, lines: &Option<Vec<Vec<u8>>>) {
    for line in lines.iter().flatten() {
        headers.append(name.clone(), HeaderValue::from_bytes(line).unwrap());
    }
}

/// Sends `request` through `layer` in front of an origin that answers `200`
/// with `headers`; returns the `Cache-Status` after reading the body.
async fn send(
    layer: &FenceLayer,
    calls: &Arc<AtomicUsize>,
    headers: &HeaderMap,
    request: Request<Body>,
) -> String {
    let origin = service_fn({
        let (calls, headers) = (calls.clone(), headers.clone());
        move |_req: Request<Body>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let mut response = Response::new(Body::from(format!("call {n}")));
            *response.headers_mut() = headers.clone();
            async move { Ok::<_, Infallible>(response) }
        }
    });
    let service = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(origin);
    let response = service.oneshot(request).await.unwrap();
    let status = response
        .headers()
        .get(&CACHE_STATUS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // Every response carries the typed outcome, and it says what the
    // header says.
    let outcome = response
        .extensions()
        .get::<tower_fence::CacheOutcome>()
        .expect("every response carries its CacheOutcome");
    assert_eq!(outcome.cache_status(), status);
    use tower_fence::Served;
    let stale_details = [
        "stale-while-revalidate",
        "stale-if-error",
        "max-stale",
        "wait-timeout",
        "origin-unreachable",
    ];
    let expected = if stale_details
        .iter()
        .any(|d| status.contains(&format!("detail={d}")))
    {
        Served::Stale
    } else if status.contains("; hit") {
        Served::Hit
    } else if status.contains("; collapsed") {
        Served::Collapsed
    } else if status.contains("fwd=bypass") {
        Served::Bypass
    } else {
        Served::Miss
    };
    assert_eq!(outcome.served(), expected, "{status}");
    response.into_body().collect().await.unwrap();
    status
}

fn get(headers: &HeaderMap) -> Request<Body> {
    let mut request = Request::get("/p").body(Body::empty()).unwrap();
    *request.headers_mut() = headers.clone();
    request
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A response whose `Cache-Control` or `CDN-Cache-Control` does not
    /// parse is never stored: the next request goes to the origin again. A
    /// field that parses to nothing the layer knows caches like no field (a
    /// `200` under the default TTL: the next request is a hit).
    #[test]
    fn a_response_field_that_does_not_parse_is_never_stored(
        general in field(),
        targeted in field(),
    ) {
        let mut headers = HeaderMap::new();
        append(&mut headers, &CACHE_CONTROL, &general);
        append(&mut headers, &HeaderName::from_static("cdn-cache-control"), &targeted);
        let governing = fuzzing::governing_cache_control(&headers);
        let layer = FenceLayer::memory();
        let calls = Arc::new(AtomicUsize::new(0));
        let (first, second) = runtime().block_on(async {
            let first = send(&layer, &calls, &headers, get(&HeaderMap::new())).await;
            let second = send(&layer, &calls, &headers, get(&HeaderMap::new())).await;
            (first, second)
        });
        match governing {
            Err(()) => {
                prop_assert_eq!(calls.load(Ordering::SeqCst), 2, "{:?}: {}", headers, second);
                prop_assert!(first.contains("detail=cache-control"), "{}", first);
                prop_assert!(!second.contains("hit"), "{}", second);
            }
            Ok(cc) if cc == CacheControl::default() => {
                prop_assert_eq!(calls.load(Ordering::SeqCst), 1, "{:?}: {}", headers, second);
                prop_assert!(second.contains("hit"), "{}", second);
            }
            Ok(_) => {}
        }
    }

    /// A request whose `Cache-Control` does not parse is never served from
    /// the cache, even when a fresh entry is there.
    #[test]
    fn a_request_field_that_does_not_parse_bypasses_the_cache(lines in field()) {
        let mut request_headers = HeaderMap::new();
        append(&mut request_headers, &CACHE_CONTROL, &lines);
        let parsed = fuzzing::parse_cache_control(&request_headers, &CACHE_CONTROL);
        let layer = FenceLayer::memory();
        let calls = Arc::new(AtomicUsize::new(0));
        let response = HeaderMap::new();
        let status = runtime().block_on(async {
            send(&layer, &calls, &response, get(&HeaderMap::new())).await;
            send(&layer, &calls, &response, get(&request_headers)).await
        });
        if parsed.is_err() {
            prop_assert_eq!(calls.load(Ordering::SeqCst), 2, "{:?}: {}", request_headers, status);
            prop_assert!(status.contains("fwd=bypass") && status.contains("detail=cache-control"), "{}", status);
        } else if parsed == Ok(CacheControl::default()) {
            prop_assert_eq!(calls.load(Ordering::SeqCst), 1, "{:?}: {}", request_headers, status);
        }
    }

    /// `FenceLayer::cache_key` of any request `http` accepts: deterministic,
    /// the derivation's key, shaped `tf:{readable path}#{hash}` with no
    /// glob character or extra brace, and selected by its path's
    /// invalidation patterns; `HEAD` shares `GET`'s key.
    #[test]
    fn cache_keys_of_any_request(
        method in "[A-Z]{1,8}",
        target in prop_oneof!["/[ -~]{0,40}", "http://[a-zA-Z.]{1,10}/[ -~]{0,20}", any::<String>()],
        headers in proptest::collection::vec(
            ("host|x-a|cookie|[a-z]{1,4}", proptest::collection::vec(any::<u8>(), 0..12)),
            0..4,
        ),
    ) {
        let (Ok(method), Ok(uri)) = (Method::from_bytes(method.as_bytes()), target.parse::<Uri>())
        else {
            return Ok(());
        };
        let mut request = Request::new(());
        *request.method_mut() = method;
        *request.uri_mut() = uri.clone();
        for (name, value) in headers {
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                request.headers_mut().append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
            }
        }
        let layer = FenceLayer::memory();
        let key = layer.cache_key(&request);
        prop_assert_eq!(&layer.cache_key(&request), &key);
        prop_assert_eq!(
            &fuzzing::cache_key(DEFAULT_NAMESPACE, &[], request.method(), request.uri(), request.headers()),
            &key
        );
        let (readable, hash) = key[DEFAULT_NAMESPACE.len()..].split_once('#').unwrap();
        prop_assert_eq!(key.matches('{').count(), 1);
        prop_assert_eq!(key.matches('}').count(), 1);
        prop_assert_eq!(hash.len(), 34);
        prop_assert!(
            !readable.contains(['*', '?', '[', ']', '\\', '{', '}', '#', ' ']),
            "{}",
            key
        );
        if uri.path().starts_with('/') {
            prop_assert!(KeyPattern::prefix(DEFAULT_NAMESPACE, uri.path()).matches(&key));
            prop_assert!(KeyPattern::path(DEFAULT_NAMESPACE, uri.path()).matches(&key));
        }
        let as_head = {
            let mut head = Request::new(());
            *head.method_mut() = Method::HEAD;
            *head.uri_mut() = uri;
            *head.headers_mut() = request.headers().clone();
            head
        };
        if request.method() == Method::GET {
            prop_assert_eq!(layer.cache_key(&as_head), key);
        }
    }
}
