//! Range requests answered from stored full responses (RFC 9110 §14),
//! against the real layer on the memory store and on a real Redis: each
//! test counts the origin's calls and compares every slice with the
//! origin's own bytes.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::RedisProcess;
use tokio::sync::Notify;
use tower::Layer;
use tower::{Service, ServiceExt};
use tower_fence::store::MemoryStore;
use tower_fence::{FenceLayer, FenceLayerBuilder, FenceService};

/// Length of the origin's representation.
const LEN: usize = 1000;

/// The origin's representation: bytes that differ from their neighbours,
/// so a slice at the wrong offset cannot compare equal.
fn representation() -> Bytes {
    (0..LEN).map(|i| b'a' + ((i * 7) % 26) as u8).collect()
}

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

/// The origin: `GET /file?…` with `cc=` (Cache-Control, default
/// `max-age=60`), `etag=` (a quoted ETag), `partial` (always answers `206`
/// for bytes 0-9), `ranges` (honours a `Range` of the form `bytes=a-b`
/// itself), `stream` (the body comes in frames the origin yields between),
/// `gate` (waits for the test's go before answering). It answers
/// `If-None-Match` equal to its ETag with `304`.
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
    /// The headers of each request it got.
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    entered: Arc<Notify>,
    go: Arc<Notify>,
}

impl Origin {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn seen(&self, n: usize) -> HeaderMap {
        self.seen.lock().unwrap()[n].clone()
    }

    fn router(&self) -> Router {
        async fn file(
            State(origin): State<Origin>,
            RawQuery(query): RawQuery,
            headers: HeaderMap,
        ) -> http::Response<Body> {
            origin.calls.fetch_add(1, Ordering::SeqCst);
            origin.seen.lock().unwrap().push(headers.clone());
            let query = query.unwrap_or_default();
            let param = |name: &str| {
                query.split('&').find_map(|pair| {
                    let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (n == name).then(|| v.replace("%20", " ").replace("%22", "\""))
                })
            };
            if param("gate").is_some() {
                origin.entered.notify_one();
                origin.go.notified().await;
            }
            let cc = param("cc").unwrap_or_else(|| "max-age=60".to_owned());
            let mut response = http::Response::builder()
                .header("cache-control", cc)
                .header("content-type", "text/plain");
            if let Some(etag) = param("etag") {
                if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(&etag) {
                    return response
                        .status(304)
                        .header("etag", etag)
                        .body(Body::empty())
                        .unwrap();
                }
                response = response.header("etag", etag);
            }
            let body = representation();
            if param("partial").is_some() {
                return response
                    .status(206)
                    .header("content-range", format!("bytes 0-9/{LEN}"))
                    .body(Body::from(body.slice(0..10)))
                    .unwrap();
            }
            let asked = headers.get("range").and_then(|v| v.to_str().ok());
            if let (Some(_), Some(range)) = (param("ranges"), asked) {
                let (a, b) = range
                    .strip_prefix("bytes=")
                    .and_then(|r| r.split_once('-'))
                    .unwrap();
                let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                return response
                    .status(206)
                    .header("content-range", format!("bytes {a}-{b}/{LEN}"))
                    .body(Body::from(body.slice(a..=b)))
                    .unwrap();
            }
            if param("stream").is_some() {
                let chunks: Vec<Bytes> = body.chunks(100).map(Bytes::copy_from_slice).collect();
                let stream = futures_util::stream::unfold(chunks.into_iter(), |mut it| async {
                    tokio::task::yield_now().await;
                    it.next()
                        .map(|c| (Ok::<_, std::convert::Infallible>(c), it))
                });
                return response.body(Body::from_stream(stream)).unwrap();
            }
            response.body(Body::from(body)).unwrap()
        }
        Router::new()
            .route("/file", get(file))
            .with_state(self.clone())
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    fn is_hit(&self) -> bool {
        self.header("cache-status").starts_with("tower-fence; hit")
    }
}

fn request(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Body::empty()).unwrap()
}

async fn reply(response: http::Response<tower_fence::FenceBody<Body>>) -> Reply {
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn send(app: &App, uri: &str, headers: &[(&str, &str)]) -> Reply {
    send_method(app, Method::GET, uri, headers).await
}

async fn send_method(app: &App, method: Method, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        app.clone().oneshot(request(method, uri, headers)),
    )
    .await
    .expect("a response within 10 s")
    .unwrap();
    reply(response).await
}

/// The layer around the origin as one service, whose `call` plans the
/// request at once (a waiter joins the running flight in `call`).
type App = FenceService<Router>;

async fn app(backend: &Backend, origin: &Origin) -> App {
    let layer = backend.builder().await.build().unwrap();
    layer.layer(origin.router())
}

/// The parts of a `multipart/byteranges` body: each part's
/// `Content-Range` and bytes.
fn multipart(reply: &Reply) -> Vec<(String, Bytes)> {
    let boundary = reply
        .header("content-type")
        .strip_prefix("multipart/byteranges; boundary=")
        .expect("a multipart/byteranges content type");
    let delimiter = format!("--{boundary}");
    let text = reply.body.clone();
    let mut parts = Vec::new();
    let mut rest = &text[..];
    assert!(rest.ends_with(format!("{delimiter}--\r\n").as_bytes()));
    loop {
        rest = rest
            .strip_prefix(delimiter.as_bytes())
            .expect("a delimiter");
        if rest == b"--\r\n" {
            return parts;
        }
        let head_end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = std::str::from_utf8(&rest[..head_end]).unwrap();
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("content-range: "))
            .unwrap()
            .to_owned();
        assert!(head.contains("content-type: text/plain"));
        let body_start = head_end + 4;
        let next = rest[body_start..]
            .windows(delimiter.len())
            .position(|w| w == delimiter.as_bytes())
            .unwrap()
            + body_start;
        // Each part's bytes end with CRLF before the next delimiter.
        parts.push((range, Bytes::copy_from_slice(&rest[body_start..next - 2])));
        rest = &rest[next..];
    }
}

async fn miss_is_fetched_whole_once_then_sliced(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    let full = representation();

    let first = send(&app, "/file", &[("range", "bytes=10-19")]).await;
    assert_eq!(first.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(first.body, full.slice(10..20));
    assert_eq!(first.header("content-range"), "bytes 10-19/1000");
    assert_eq!(first.header("content-length"), "10");
    assert!(first.header("cache-status").contains("stored"));
    assert_eq!(origin.calls(), 1);
    // The origin was asked for the whole representation.
    assert!(origin.seen(0).get("range").is_none());

    let second = send(&app, "/file", &[("range", "bytes=-5")]).await;
    assert_eq!(second.status, StatusCode::PARTIAL_CONTENT);
    assert!(second.is_hit());
    assert_eq!(second.body, full.slice(995..));
    assert_eq!(second.header("content-range"), "bytes 995-999/1000");

    let whole = send(&app, "/file", &[]).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert!(whole.is_hit());
    assert_eq!(whole.body, full);
    assert_eq!(whole.header("accept-ranges"), "bytes");
    assert_eq!(origin.calls(), 1);
}

async fn several_ranges_are_multipart(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    let full = representation();
    send(&app, "/file", &[]).await;

    let reply = send(&app, "/file", &[("range", "bytes=0-4, 500-509, -3")]).await;
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
    assert!(reply.is_hit());
    assert_eq!(
        reply.header("content-length"),
        reply.body.len().to_string().as_str()
    );
    assert!(reply.headers.get("content-range").is_none());
    let parts = multipart(&reply);
    assert_eq!(
        parts,
        vec![
            ("bytes 0-4/1000".to_owned(), full.slice(0..5)),
            ("bytes 500-509/1000".to_owned(), full.slice(500..510)),
            ("bytes 997-999/1000".to_owned(), full.slice(997..)),
        ]
    );
    assert_eq!(origin.calls(), 1);
}

async fn unsatisfiable_and_ignored_ranges(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    let full = representation();
    send(&app, "/file", &[]).await;

    let reply = send(&app, "/file", &[("range", "bytes=1000-")]).await;
    assert_eq!(reply.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(reply.header("content-range"), "bytes */1000");
    assert!(reply.body.is_empty());

    // Ignored: the full 200 (RFC 9110 §14.2).
    let many: Vec<String> = (0..17).map(|i| format!("{}-{}", i * 10, i * 10)).collect();
    let many = format!("bytes={}", many.join(","));
    for ignored in [
        "items=0-1",
        "bytes=5-1",
        "bytes=0-99, 10-99, 20-99",
        many.as_str(),
    ] {
        let reply = send(&app, "/file", &[("range", ignored)]).await;
        assert_eq!(reply.status, StatusCode::OK, "{ignored}");
        assert_eq!(reply.body, full, "{ignored}");
    }
    // A HEAD's Range is ignored: the full response's head.
    let head = send_method(&app, Method::HEAD, "/file", &[("range", "bytes=0-1")]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.is_hit());
    assert_eq!(head.header("content-length"), "1000");
    assert!(head.body.is_empty());
    assert_eq!(origin.calls(), 1);
}

async fn if_range_needs_the_strong_current_etag(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    let full = representation();
    let uri = "/file?etag=%22v1%22";
    send(&app, uri, &[]).await;

    let range = ("range", "bytes=0-1");
    let matching = send(&app, uri, &[range, ("if-range", "\"v1\"")]).await;
    assert_eq!(matching.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(matching.body, full.slice(0..2));
    for other in ["\"v2\"", "W/\"v1\"", "Sun, 06 Nov 1994 08:49:37 GMT"] {
        let reply = send(&app, uri, &[range, ("if-range", other)]).await;
        assert_eq!(reply.status, StatusCode::OK, "{other}");
        assert_eq!(reply.body, full, "{other}");
    }
    // A validator that matches wins over the range: 304 (RFC 9110 §13.2.2).
    let not_modified = send(&app, uri, &[range, ("if-none-match", "\"v1\"")]).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert_eq!(origin.calls(), 1);
}

async fn waiters_with_other_ranges_get_their_own_slices(backend: Backend) {
    let origin = Origin::default();
    let mut app = app(&backend, &origin).await;
    let full = representation();
    let uri = "/file?gate";
    // The leader has no Range; it holds the origin until every waiter has
    // joined its flight.
    let leader = tokio::spawn(app.clone().oneshot(request(Method::GET, uri, &[])));
    origin.entered.notified().await;
    let asked = [
        "bytes=0-9",
        "bytes=100-199",
        "bytes=-1",
        "bytes=0-0,2-2",
        "bytes=5000-",
    ];
    let mut waiters = Vec::new();
    for range in asked {
        // `call` joins the running flight at once.
        let svc = ServiceExt::<Request<Body>>::ready(&mut app).await.unwrap();
        waiters.push(svc.call(request(Method::GET, uri, &[("range", range)])));
    }
    origin.go.notify_one();
    let leader = reply(leader.await.unwrap().unwrap()).await;
    assert_eq!(leader.status, StatusCode::OK);
    assert_eq!(leader.body, full);
    let mut replies = Vec::new();
    for waiter in waiters {
        replies.push(reply(waiter.await.unwrap()).await);
    }
    assert_eq!(origin.calls(), 1);
    for r in &replies {
        assert!(
            r.header("cache-status").contains("collapsed"),
            "{}",
            r.header("cache-status")
        );
    }
    assert_eq!(replies[0].body, full.slice(0..10));
    assert_eq!(replies[1].body, full.slice(100..200));
    assert_eq!(replies[2].body, full.slice(999..));
    assert_eq!(multipart(&replies[3]).len(), 2);
    assert_eq!(replies[4].status, StatusCode::RANGE_NOT_SATISFIABLE);
}

async fn a_streaming_rebuild_still_answers_the_range(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    let full = representation();
    let uri = "/file?stream";
    let first = send(&app, uri, &[("range", "bytes=250-349")]).await;
    assert_eq!(first.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(first.body, full.slice(250..350));
    let second = send(&app, uri, &[("range", "bytes=900-")]).await;
    assert!(second.is_hit());
    assert_eq!(second.body, full.slice(900..));
    assert_eq!(origin.calls(), 1);
}

async fn partial_content_from_the_origin_is_never_stored(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    let full = representation();
    for n in 1..=3 {
        let reply = send(&app, "/file?partial", &[("range", "bytes=0-9")]).await;
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(reply.body, full.slice(0..10));
        assert!(!reply.is_hit());
        assert_eq!(origin.calls(), n);
    }
    let whole = send(&app, "/file?partial", &[]).await;
    assert_eq!(whole.status, StatusCode::PARTIAL_CONTENT);
    assert!(!whole.is_hit());
    assert_eq!(origin.calls(), 4);
}

async fn bodies_over_the_cap_pass_through_with_the_range(backend: Backend) {
    let origin = Origin::default();
    let layer = backend.builder().await.max_body_size(100).build().unwrap();
    let app = layer.layer(origin.router());
    let full = representation();
    let uri = "/file?ranges";
    // The rebuild asked for the whole representation, found it too large:
    // its client gets it whole (the range ignored, RFC 9110 §14.2).
    let first = send(&app, uri, &[("range", "bytes=0-9")]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, full);
    // From then on a Range request goes to the origin with its Range.
    let second = send(&app, uri, &[("range", "bytes=20-29")]).await;
    assert_eq!(second.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(second.body, full.slice(20..30));
    assert_eq!(origin.seen(1).get("range").unwrap(), "bytes=20-29");
    assert_eq!(origin.calls(), 2);
    let third = send(&app, uri, &[("range", "bytes=20-29")]).await;
    assert!(!third.is_hit());
    assert_eq!(origin.calls(), 3);
}

async fn revalidated_entry_answers_the_range(backend: Backend) {
    let origin = Origin::default();
    let app = app(&backend, &origin).await;
    let full = representation();
    // Stored, but validated on every use.
    let uri = "/file?etag=%22v1%22&cc=no-cache";
    send(&app, uri, &[]).await;
    assert_eq!(origin.calls(), 1);
    let reply = send(&app, uri, &[("range", "bytes=40-59")]).await;
    assert_eq!(origin.calls(), 2);
    let sent = origin.seen(1);
    assert_eq!(sent.get("if-none-match").unwrap(), "\"v1\"");
    assert!(sent.get("range").is_none());
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(reply.body, full.slice(40..60));
    assert!(reply.header("cache-status").contains("fwd-status=304"));
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
    miss_is_fetched_whole_once_then_sliced,
    several_ranges_are_multipart,
    unsatisfiable_and_ignored_ranges,
    if_range_needs_the_strong_current_etag,
    waiters_with_other_ranges_get_their_own_slices,
    a_streaming_rebuild_still_answers_the_range,
    partial_content_from_the_origin_is_never_stored,
    bodies_over_the_cap_pass_through_with_the_range,
    revalidated_entry_answers_the_range,
);
