//! End-to-end tests of the caching reverse proxy in `examples/proxy.rs`: an
//! axum upstream started in the test, the proxy in front of it on a free
//! port, and a hyper client talking to the proxy over TCP.

#[path = "../examples/proxy.rs"]
#[allow(dead_code)] // `main`, `run` and the signal handling are the binary's.
mod proxy;

#[cfg(feature = "redis")]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Generous bound on anything a test waits for.
const WAIT: Duration = Duration::from_secs(30);
/// Size of the `/big` body: three times the cache's 1 MiB body cap.
const BIG: usize = 3 * 1024 * 1024;

// ---------------------------------------------------------------------------
// The upstream
// ---------------------------------------------------------------------------

/// An axum app on a free loopback port that counts the requests it serves.
struct Upstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route("/max-age", get(max_age))
            .route("/no-headers", get(no_headers))
            .route("/private", get(private))
            .route("/cookie", get(cookie))
            .route("/big", get(big))
            .route("/echo", post(echo))
            .route("/headers", get(headers))
            .route("/links", get(links))
            .route("/slow", get(slow))
            .route("/tagged/{id}", get(tagged))
            .route("/encoded", get(encoded))
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("serve the upstream");
        });
        Upstream { addr, calls, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Calls = State<Arc<AtomicUsize>>;

fn count(calls: &AtomicUsize) -> usize {
    calls.fetch_add(1, Ordering::SeqCst) + 1
}

async fn max_age(State(calls): Calls) -> impl IntoResponse {
    let n = count(&calls);
    ([(header::CACHE_CONTROL, "max-age=60")], format!("call {n}"))
}

async fn slow(State(calls): Calls) -> impl IntoResponse {
    let n = count(&calls);
    tokio::time::sleep(Duration::from_millis(100)).await;
    (
        [(header::CACHE_CONTROL, "max-age=60")],
        format!("slow call {n}"),
    )
}

/// Varies on `Accept-Encoding`; the body is the value the upstream got.
async fn encoded(State(calls): Calls, headers: HeaderMap) -> impl IntoResponse {
    count(&calls);
    let got = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    (
        [
            (header::CACHE_CONTROL, "max-age=60"),
            (header::VARY, "Accept-Encoding"),
        ],
        got,
    )
}

/// Fresh for 60 s, tagged `item-{id}` and `items`.
async fn tagged(
    State(calls): Calls,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> impl IntoResponse {
    let n = count(&calls);
    (
        [
            (header::CACHE_CONTROL, "max-age=60".to_owned()),
            (
                HeaderName::from_static("surrogate-key"),
                format!("item-{id} items"),
            ),
        ],
        format!("{id} call {n}"),
    )
}

async fn no_headers(State(calls): Calls) -> String {
    format!("call {}", count(&calls))
}

async fn private(State(calls): Calls) -> impl IntoResponse {
    let n = count(&calls);
    (
        [(header::CACHE_CONTROL, "private, max-age=60")],
        format!("call {n}"),
    )
}

async fn cookie(State(calls): Calls) -> impl IntoResponse {
    let n = count(&calls);
    (
        [
            (header::CACHE_CONTROL, "max-age=60"),
            (header::SET_COOKIE, "session=abc"),
        ],
        format!("call {n}"),
    )
}

/// The `/big` body: 3 MiB that are not all the same byte.
fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

async fn big(State(calls): Calls) -> impl IntoResponse {
    count(&calls);
    ([(header::CACHE_CONTROL, "max-age=60")], big_body())
}

async fn echo(State(calls): Calls, body: Bytes) -> Bytes {
    count(&calls);
    body
}

/// A page whose links name the `X-Forwarded-Host` the upstream got, as apps
/// that build absolute URLs behind a proxy do; fresh for 60 s.
async fn links(State(calls): Calls, headers: HeaderMap) -> impl IntoResponse {
    let n = count(&calls);
    let host = headers
        .get("x-forwarded-host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    (
        [(header::CACHE_CONTROL, "max-age=60")],
        format!("<a href=\"http://{host}/next\">next</a> call {n}"),
    )
}

/// The request line's target and the headers as the upstream got them, one
/// `name: value` a line.
async fn headers(State(calls): Calls, uri: Uri, headers: HeaderMap) -> String {
    count(&calls);
    let mut out = format!("uri: {uri}\n");
    for (name, value) in &headers {
        out.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
    }
    out
}

// ---------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------

/// The example's proxy, run in this test's runtime on a free port.
struct Proxy {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), proxy::BoxError>>,
}

impl Proxy {
    /// Starts the proxy with `extra` command-line arguments and
    /// `--listen 127.0.0.1:0`, and waits until it accepts connections.
    async fn start(extra: &[&str]) -> Self {
        Proxy::start_args(Proxy::args(extra)).await
    }

    /// The proxy's settings for `extra` command-line arguments and
    /// `--listen 127.0.0.1:0`.
    fn args(extra: &[&str]) -> proxy::Args {
        let mut argv: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        argv.extend(["--listen".to_owned(), "127.0.0.1:0".to_owned()]);
        proxy::parse_args(argv).expect("valid arguments")
    }

    /// Starts the proxy with `args` and waits until it accepts connections.
    async fn start_args(args: proxy::Args) -> Self {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy::run_until(
            args,
            move |addr| {
                let _ = ready_tx.send(addr);
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let addr = match tokio::time::timeout(WAIT, ready_rx).await {
            Ok(Ok(addr)) => addr,
            _ => panic!("the proxy did not get ready: {:?}", task.await),
        };
        assert_eq!(addr.ip().to_string(), "127.0.0.1");
        assert_ne!(addr.port(), 0, "ready reports the bound port");
        Proxy {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn for_upstream(upstream: &Upstream, extra: &[&str]) -> Self {
        Proxy::for_upstream_url(&upstream.url(), extra).await
    }

    async fn for_upstream_url(url: &str, extra: &[&str]) -> Self {
        let mut argv = vec!["--upstream", url];
        argv.extend_from_slice(extra);
        Proxy::start(&argv).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Asks the proxy to stop and waits for `run_until` to return.
    async fn shutdown(mut self) -> Result<(), proxy::BoxError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the proxy stops")
            .expect("the proxy task does not panic")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

type ClientBody = BoxBody<Bytes, Infallible>;

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn empty() -> ClientBody {
    Empty::new().boxed()
}

fn full(data: impl Into<Bytes>) -> ClientBody {
    Full::new(data.into()).boxed()
}

/// A whole response as the client saw it.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
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
        self.cache_status().contains("tower-fence; hit")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The value of `name` in an `/headers` echo.
    fn echoed(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}: ");
        self.text()
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()).map(str::to_owned))
    }
}

async fn send(req: Request<ClientBody>) -> Reply {
    send_with(&client(), req).await
}

async fn send_with(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, ClientBody>,
    req: Request<ClientBody>,
) -> Reply {
    let what = format!("{} {}", req.method(), req.uri());
    let exchange = async {
        let response = client
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the body: {e}"))
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{what}: no response within {WAIT:?}"))
}

async fn get_path(proxy: &Proxy, path: &str) -> Reply {
    send(Request::get(proxy.url(path)).body(empty()).unwrap()).await
}

/// A port nothing listens on: bound, read and closed again.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------
// Caching through the proxy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn second_get_of_max_age_is_a_hit_with_age() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    let first = get_path(&proxy, "/max-age").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.text(), "call 1");
    let status = first.cache_status();
    assert!(status.contains("fwd=uri-miss"), "{status}");
    assert!(status.contains("stored"), "{status}");

    let second = get_path(&proxy, "/max-age").await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.text(), "call 1");
    assert!(second.is_hit(), "{}", second.cache_status());
    assert!(
        second.headers.contains_key(header::AGE),
        "{:?}",
        second.headers
    );
    assert_eq!(second.headers["cache-control"], "max-age=60");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_a_cold_key_reach_the_upstream_once() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;
    let url = proxy.url("/slow");
    // Each request on a connection of its own, all at once.
    let requests: Vec<_> = (0..300)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { send(Request::get(url).body(empty()).unwrap()).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        bodies.push(reply.text());
    }
    assert_eq!(upstream.calls(), 1);
    assert!(bodies.iter().all(|b| b == "slow call 1"));
}

#[tokio::test]
async fn no_headers_is_not_stored_with_default_ttl_zero() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    let first = get_path(&proxy, "/no-headers").await;
    let second = get_path(&proxy, "/no-headers").await;
    assert_eq!(first.text(), "call 1");
    assert_eq!(second.text(), "call 2");
    assert!(!second.is_hit(), "{}", second.cache_status());
    assert!(!first.cache_status().contains("stored"));
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn no_headers_is_stored_with_a_default_ttl() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--default-ttl", "30"]).await;

    let first = get_path(&proxy, "/no-headers").await;
    assert!(
        first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    let second = get_path(&proxy, "/no-headers").await;
    assert_eq!(second.text(), "call 1");
    assert!(second.is_hit(), "{}", second.cache_status());
    let ttl: i64 = second
        .cache_status()
        .split("ttl=")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|ttl| ttl.trim().parse().ok())
        .expect("a ttl in Cache-Status");
    assert!((0..=30).contains(&ttl), "ttl={ttl}");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn private_responses_are_not_stored() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--default-ttl", "30"]).await;

    let first = get_path(&proxy, "/private").await;
    let second = get_path(&proxy, "/private").await;
    assert_eq!(second.text(), "call 2");
    assert!(!second.is_hit());
    assert!(
        first.cache_status().contains("detail=private"),
        "{}",
        first.cache_status()
    );
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn responses_setting_a_cookie_are_not_stored() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    let first = get_path(&proxy, "/cookie").await;
    let second = get_path(&proxy, "/cookie").await;
    assert_eq!(first.headers[header::SET_COOKIE], "session=abc");
    assert_eq!(second.headers[header::SET_COOKIE], "session=abc");
    assert_eq!(second.text(), "call 2");
    assert!(!second.is_hit());
    assert!(
        first.cache_status().contains("detail=set-cookie"),
        "{}",
        first.cache_status()
    );
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn big_bodies_stream_through_whole_and_are_not_stored() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;
    let expected = big_body();

    for round in 1..=2 {
        let reply = get_path(&proxy, "/big").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.len(), BIG, "round {round}");
        assert!(reply.body == expected, "round {round}: the body differs");
        assert!(!reply.is_hit(), "round {round}: {}", reply.cache_status());
        assert!(
            !reply.cache_status().contains("stored"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn post_is_forwarded_with_its_body() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    let req = Request::post(proxy.url("/echo"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full("hello upstream"))
        .unwrap();
    let reply = send(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "hello upstream");
    assert!(
        reply.cache_status().contains("fwd=bypass"),
        "{}",
        reply.cache_status()
    );
    assert_eq!(upstream.calls(), 1);
}

/// A request body of separate chunks and no known length, each chunk
/// handed out on its own poll.
struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let next = self.0.pop_front();
        if next.is_some() {
            // Let the other side run between chunks.
            cx.waker().wake_by_ref();
        }
        std::task::Poll::Ready(next.map(|chunk| Ok(http_body::Frame::data(chunk))))
    }
}

#[tokio::test]
async fn a_chunked_request_body_is_streamed_to_the_upstream() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    // No length known up front: the client sends it chunked.
    let chunks = (0..64).map(|i| Bytes::from(format!("chunk {i:02};").into_bytes()));
    let req = Request::post(proxy.url("/echo"))
        .body(Chunks(chunks.collect()).boxed())
        .unwrap();
    let reply = send(req).await;
    let expected: String = (0..64).map(|i| format!("chunk {i:02};")).collect();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), expected);
}

#[tokio::test]
async fn head_after_a_cached_get_is_a_hit_without_a_body() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    let first = get_path(&proxy, "/max-age").await;
    assert!(
        first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    let head = send(Request::head(proxy.url("/max-age")).body(empty()).unwrap()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.is_hit(), "{}", head.cache_status());
    assert!(head.body.is_empty());
    assert_eq!(head.headers[header::CONTENT_LENGTH], "6"); // "call 1"
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn entries_are_keyed_by_the_public_host() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;
    let get_as = |host: &'static str| {
        Request::get(proxy.url("/max-age"))
            .header(header::HOST, host)
            .body(empty())
            .unwrap()
    };

    assert_eq!(send(get_as("a.example")).await.text(), "call 1");
    assert_eq!(send(get_as("b.example")).await.text(), "call 2");
    let again = send(get_as("a.example")).await;
    assert!(again.is_hit(), "{}", again.cache_status());
    assert_eq!(again.text(), "call 1");
    assert_eq!(upstream.calls(), 2);
}

// ---------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_host_is_kept() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    let req = Request::get(proxy.url("/headers?a=1&b=two"))
        .header(header::HOST, "public.example:8443")
        .header(header::CONNECTION, "keep-alive, x-secret")
        .header("x-secret", "hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header(header::TE, "trailers")
        .header("x-normal", "end-to-end")
        .body(empty())
        .unwrap();
    let reply = send(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.echoed("uri").as_deref(), Some("/headers?a=1&b=two"));
    assert_eq!(reply.echoed("host").as_deref(), Some("public.example:8443"));
    assert_eq!(reply.echoed("x-normal").as_deref(), Some("end-to-end"));
    assert_eq!(
        reply.echoed("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    for hop in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
    ] {
        assert_eq!(
            reply.echoed(hop),
            None,
            "{hop} reached the upstream:\n{}",
            reply.text()
        );
    }
}

#[tokio::test]
async fn a_request_without_host_gets_the_upstream_authority() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    // HTTP/1.0 allows a request without Host; hyper's client always adds one.
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"GET /headers HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        String::from_utf8(raw).unwrap()
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("an answer");
    assert!(
        raw.starts_with("HTTP/1.0 200") || raw.starts_with("HTTP/1.1 200"),
        "{raw}"
    );
    let expected = format!("host: {}", upstream.addr);
    assert!(raw.lines().any(|line| line == expected), "{raw}");
}

#[tokio::test]
async fn an_unreachable_upstream_gives_502() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let proxy = Proxy::start(&["--upstream", url.as_str()]).await;
    let client = client();

    for _ in 0..2 {
        let reply = send_with(
            &client,
            Request::get(proxy.url("/max-age")).body(empty()).unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert!(!reply.body.is_empty());
        assert!(reply.text().contains("Bad Gateway"), "{}", reply.text());
        assert_eq!(
            reply.headers.get(header::CONTENT_TYPE),
            Some(&HeaderValue::from_static("text/plain; charset=utf-8"))
        );
        assert!(!reply.is_hit());
    }
    let post = send_with(
        &client,
        Request::post(proxy.url("/echo")).body(full("x")).unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;
    assert_eq!(get_path(&proxy, "/max-age").await.text(), "call 1");

    let addr = proxy.addr;
    proxy.shutdown().await.expect("a clean stop");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

// ---------------------------------------------------------------------------
// The request's host (RFC 9112 §3.2)
// ---------------------------------------------------------------------------

/// Writes `request` as it is on a connection of its own and reads the
/// answer until the proxy closes it. `request` should say
/// `Connection: close`.
async fn raw_exchange(proxy: &Proxy, request: &str) -> String {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        // A reset after the answer still leaves the answer in `raw`.
        let _ = stream.read_to_end(&mut raw).await;
        String::from_utf8_lossy(&raw).into_owned()
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer within {WAIT:?} to {request:?}"))
}

/// The status code of a raw answer, `0` if there is none.
fn raw_status(raw: &str) -> u16 {
    raw.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn two_host_lines_get_400_and_touch_neither_upstream_nor_cache() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--default-ttl", "30"]).await;

    for hosts in [
        "Host: evil.example\r\nHost: good.example\r\n",
        "Host: good.example\r\nHost: good.example\r\n",
        "Host: good.example\r\nX-Other: 1\r\nHost: evil.example\r\n",
    ] {
        let raw = raw_exchange(
            &proxy,
            &format!("GET /max-age HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(raw_status(&raw), 400, "{hosts:?}:\n{raw}");
        assert!(!raw.contains("call "), "{hosts:?}: forwarded:\n{raw}");
    }
    assert_eq!(
        upstream.calls(),
        0,
        "a request with two Host lines went upstream"
    );

    // Nothing was stored under either host: both are misses now.
    for (n, host) in [(1, "good.example"), (2, "evil.example")] {
        let reply = send(
            Request::get(proxy.url("/max-age"))
                .header(header::HOST, host)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.text(), format!("call {n}"), "{host}");
        assert!(!reply.is_hit(), "{host}: {}", reply.cache_status());
    }
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn a_host_that_is_not_host_and_port_gets_400() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    for host in [
        "",
        "evil.example/max-age",
        "evil.example/../x",
        "good.example evil.example",
        "good.example,evil.example",
        "good.example, evil.example",
        "user@good.example",
        "good.example:",
        "good.example:http",
        "good.example:99999",
        "good.example:80:80",
        ":80",
        "[::1",
        "[::1]x",
        "[not-ipv6]:80",
        "::1",
        "good.example?q",
        "good.example#x",
        "good\"example",
        "g\u{e9}.example",
    ] {
        let raw = raw_exchange(
            &proxy,
            &format!("GET /headers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(raw_status(&raw), 400, "Host: {host:?}:\n{raw}");
    }
    // HTTP/1.1 requires a Host (HTTP/1.0 does not: see
    // a_request_without_host_gets_the_upstream_authority).
    for target in ["/headers", "http://good.example/headers"] {
        let raw = raw_exchange(
            &proxy,
            &format!("GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(
            raw_status(&raw),
            400,
            "HTTP/1.1 {target} without Host:\n{raw}"
        );
    }
    assert_eq!(
        upstream.calls(),
        0,
        "a request with a bad Host went upstream"
    );
}

#[tokio::test]
async fn valid_hosts_are_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    let hosts = [
        "good.example",
        "Good.Example:8080",
        "127.0.0.1",
        "127.0.0.1:3000",
        "[::1]",
        "[::1]:8443",
        "xn--bcher-kva.example",
        "under_score.example",
    ];
    for host in hosts {
        let raw = raw_exchange(
            &proxy,
            &format!("GET /headers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(raw_status(&raw), 200, "Host: {host:?}:\n{raw}");
        assert!(
            raw.lines().any(|line| line == format!("host: {host}")),
            "Host: {host:?}:\n{raw}"
        );
    }
    assert_eq!(upstream.calls(), hosts.len());
}

#[tokio::test]
async fn an_absolute_target_must_name_the_host_it_is_sent_with() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--default-ttl", "30"]).await;

    for (target, host) in [
        ("http://evil.example/max-age", "good.example"),
        ("http://good.example/max-age", "evil.example"),
        ("http://good.example:8080/max-age", "good.example"),
        ("http://good.example/max-age", "good.example:8080"),
        ("http://user@good.example/max-age", "good.example"),
    ] {
        let raw = raw_exchange(
            &proxy,
            &format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(raw_status(&raw), 400, "{target} with Host {host}:\n{raw}");
    }
    assert_eq!(upstream.calls(), 0, "a mismatched target went upstream");

    // The same authority, up to case and the scheme's default port, is fine.
    for (target, host) in [
        ("http://good.example/max-age", "good.example"),
        ("http://GOOD.example/max-age", "good.EXAMPLE"),
        ("http://good.example:80/max-age", "good.example"),
    ] {
        let raw = raw_exchange(
            &proxy,
            &format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(raw_status(&raw), 200, "{target} with Host {host}:\n{raw}");
    }
    assert!(upstream.calls() >= 1);
    // Nothing evil.example asked for was stored: it is a miss.
    let evil = send(
        Request::get(proxy.url("/max-age"))
            .header(header::HOST, "evil.example")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert!(!evil.is_hit(), "{}", evil.cache_status());
}

// ---------------------------------------------------------------------------
// Forwarding headers (X-Forwarded-*, Forwarded)
// ---------------------------------------------------------------------------

/// The forwarding headers a client might send, with the values an attacker
/// would pick.
const CLIENT_FORWARDING: [(&str, &str); 5] = [
    ("x-forwarded-for", "6.6.6.6"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-port", "443"),
    ("forwarded", "for=6.6.6.6;host=evil.example;proto=https"),
];

/// `GET /links` with `headers`.
fn get_links(proxy: &Proxy, headers: &[(&str, &str)]) -> Request<ClientBody> {
    let mut req = Request::get(proxy.url("/links"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(empty()).unwrap()
}

/// How many lines of an `/headers` echo name `name`.
fn echoed_lines(reply: &Reply, name: &str) -> usize {
    let prefix = format!("{name}: ");
    reply
        .text()
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .count()
}

#[tokio::test]
async fn a_client_x_forwarded_host_cannot_poison_the_cache() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    let first = send(get_links(&proxy, &[("x-forwarded-host", "evil.example")])).await;
    assert_eq!(first.status, StatusCode::OK);
    let second = send(get_links(&proxy, &[])).await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(
        !second.text().contains("evil.example"),
        "the cache served a poisoned entry: {}",
        second.text()
    );
    // The attacker's value did not reach the upstream either.
    assert!(!first.text().contains("evil.example"), "{}", first.text());
    // The links name the host the clients asked for.
    let public = format!("href=\"http://{}/next\"", proxy.addr);
    assert!(second.text().contains(&public), "{}", second.text());
}

#[tokio::test]
async fn the_proxy_replaces_the_clients_forwarding_headers() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;

    let mut req = Request::get(proxy.url("/headers")).header(header::HOST, "public.example:8443");
    for (name, value) in CLIENT_FORWARDING {
        req = req.header(name, value);
    }
    // A second line of each, too.
    for (name, value) in CLIENT_FORWARDING {
        req = req.header(name, value);
    }
    let reply = send(req.body(empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!reply.text().contains("6.6.6.6"), "{}", reply.text());
    assert!(!reply.text().contains("evil.example"), "{}", reply.text());
    let expected = [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "public.example:8443"),
        ("x-forwarded-port", "8443"),
        (
            "forwarded",
            "for=127.0.0.1;host=\"public.example:8443\";proto=http",
        ),
    ];
    for (name, value) in expected {
        assert_eq!(
            reply.echoed(name).as_deref(),
            Some(value),
            "{}",
            reply.text()
        );
        assert_eq!(echoed_lines(&reply, name), 1, "{name}:\n{}", reply.text());
    }

    // Without a port in Host, the port is http's.
    let reply = send(
        Request::get(proxy.url("/headers"))
            .header(header::HOST, "public.example")
            .header("x-forwarded-port", "443")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.echoed("x-forwarded-port").as_deref(), Some("80"));
    assert_eq!(
        reply.echoed("forwarded").as_deref(),
        Some("for=127.0.0.1;host=public.example;proto=http")
    );
}

#[tokio::test]
async fn with_trust_forwarded_the_clients_headers_are_kept() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--trust-forwarded"]).await;

    let mut req = Request::get(proxy.url("/headers")).header(header::HOST, "public.example:8443");
    for (name, value) in CLIENT_FORWARDING {
        req = req.header(name, value);
    }
    let reply = send(req.body(empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let expected = [
        // The lists get this hop appended.
        ("x-forwarded-for", "6.6.6.6, 127.0.0.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-port", "443"),
        (
            "forwarded",
            "for=6.6.6.6;host=evil.example;proto=https, \
             for=127.0.0.1;host=\"public.example:8443\";proto=http",
        ),
    ];
    for (name, value) in expected {
        assert_eq!(
            reply.echoed(name).as_deref(),
            Some(value),
            "{}",
            reply.text()
        );
    }

    // What the client did not send, the proxy sets as it would by default.
    let reply = send(
        Request::get(proxy.url("/headers"))
            .header(header::HOST, "public.example:8443")
            .body(empty())
            .unwrap(),
    )
    .await;
    let expected = [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "public.example:8443"),
        ("x-forwarded-port", "8443"),
        (
            "forwarded",
            "for=127.0.0.1;host=\"public.example:8443\";proto=http",
        ),
    ];
    for (name, value) in expected {
        assert_eq!(
            reply.echoed(name).as_deref(),
            Some(value),
            "{}",
            reply.text()
        );
    }
}

#[tokio::test]
async fn with_trust_forwarded_x_forwarded_host_is_keyed() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--trust-forwarded"]).await;
    let evil = [("x-forwarded-host", "evil.example")];

    let first = send(get_links(&proxy, &evil)).await;
    assert!(first.text().contains("evil.example"), "{}", first.text());
    assert!(first.text().contains("call 1"), "{}", first.text());

    let second = send(get_links(&proxy, &[])).await;
    assert!(
        !second.text().contains("evil.example"),
        "the cache served a poisoned entry: {}",
        second.text()
    );
    assert!(second.text().contains("call 2"), "{}", second.text());
    assert_eq!(upstream.calls(), 2, "the two were not cached apart");

    // Each is a hit of its own entry.
    let again = send(get_links(&proxy, &evil)).await;
    assert!(again.is_hit(), "{}", again.cache_status());
    assert!(again.text().contains("call 1"), "{}", again.text());
    let again = send(get_links(&proxy, &[])).await;
    assert!(again.is_hit(), "{}", again.cache_status());
    assert!(again.text().contains("call 2"), "{}", again.text());
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn with_trust_forwarded_every_forwarding_header_is_keyed() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--trust-forwarded"]).await;

    let baseline = send(get_links(&proxy, &[])).await;
    assert!(baseline.text().contains("call 1"), "{}", baseline.text());
    for (n, header) in CLIENT_FORWARDING.iter().enumerate() {
        let reply = send(get_links(&proxy, &[*header])).await;
        assert!(!reply.is_hit(), "{header:?}: {}", reply.cache_status());
        assert!(
            reply.text().contains(&format!("call {}", n + 2)),
            "{header:?}: {}",
            reply.text()
        );
    }
    for header in CLIENT_FORWARDING {
        let reply = send(get_links(&proxy, &[header])).await;
        assert!(reply.is_hit(), "{header:?}: {}", reply.cache_status());
    }
    assert_eq!(upstream.calls(), 1 + CLIENT_FORWARDING.len());
}

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

#[test]
fn parse_args_reads_every_option() {
    let args = proxy::parse_args([
        "--upstream",
        "http://127.0.0.1:3000",
        "--listen",
        "0.0.0.0:9000",
        "--redis",
        "redis://127.0.0.1:6380/2",
        "--default-ttl",
        "45",
    ])
    .unwrap();
    assert_eq!(args.upstream_scheme.as_str(), "http");
    assert_eq!(args.upstream_authority.as_str(), "127.0.0.1:3000");
    assert_eq!(args.listen, "0.0.0.0:9000".parse::<SocketAddr>().unwrap());
    assert_eq!(args.redis.as_deref(), Some("redis://127.0.0.1:6380/2"));
    assert_eq!(args.default_ttl, Duration::from_secs(45));

    let same = proxy::parse_args([
        "--default-ttl=45",
        "--redis=redis://127.0.0.1:6380/2",
        "--listen=0.0.0.0:9000",
        "--upstream=http://127.0.0.1:3000/",
    ])
    .unwrap();
    assert_eq!(same, args);
}

#[test]
fn parse_args_defaults() {
    let args = proxy::parse_args(["--upstream", "http://localhost:3000"]).unwrap();
    assert_eq!(args.upstream_authority.as_str(), "localhost:3000");
    assert_eq!(args.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(args.redis, None);
    assert_eq!(args.default_ttl, Duration::ZERO);
    assert!(!args.trust_forwarded);
}

#[test]
fn parse_args_reads_trust_forwarded() {
    let args = proxy::parse_args(["--trust-forwarded", "--upstream", "http://a:1"]).unwrap();
    assert!(args.trust_forwarded);
    assert_eq!(args.upstream_authority.as_str(), "a:1");
    let args = proxy::parse_args(["--upstream", "http://a:1", "--trust-forwarded"]).unwrap();
    assert!(args.trust_forwarded);

    for argv in [
        &["--upstream", "http://a:1", "--trust-forwarded=yes"][..],
        &["--upstream", "http://a:1", "--trust-forwarded="][..],
        &[
            "--upstream",
            "http://a:1",
            "--trust-forwarded",
            "--trust-forwarded",
        ][..],
        &["--upstream", "http://a:1", "--trust-forwarded", "yes"][..],
    ] {
        let result = proxy::parse_args(argv.iter().copied());
        assert!(result.is_err(), "{argv:?} was accepted: {result:?}");
    }
}

#[test]
fn parse_args_rejects_bad_arguments() {
    let bad: &[&[&str]] = &[
        &[],
        &["--listen", "127.0.0.1:8080"],
        &["--upstream"],
        &["--upstream", "--listen", "127.0.0.1:8080"],
        &["--upstream", ""],
        &["--upstream", "127.0.0.1:3000"],
        &["--upstream", "not a url"],
        &["--upstream", "https://127.0.0.1:3000"],
        &["--upstream", "ftp://127.0.0.1:3000"],
        &["--upstream", "http://127.0.0.1:3000/prefix"],
        &["--upstream", "http://127.0.0.1:3000/?q=1"],
        &["--upstream", "http://user@127.0.0.1:3000"],
        &["--upstream", "http://a:1", "--upstream", "http://b:2"],
        &["--upstream", "http://a:1", "--listen", "localhost"],
        &["--upstream", "http://a:1", "--listen", "127.0.0.1:99999"],
        &["--upstream", "http://a:1", "--listen"],
        &["--upstream", "http://a:1", "--default-ttl", "-1"],
        &["--upstream", "http://a:1", "--default-ttl", "1.5"],
        &["--upstream", "http://a:1", "--default-ttl", "soon"],
        &[
            "--upstream",
            "http://a:1",
            "--redis",
            "http://127.0.0.1:6379",
        ],
        &["--upstream", "http://a:1", "--verbose"],
        &["--upstream", "http://a:1", "stray"],
        &["-u", "http://a:1"],
    ];
    for argv in bad {
        let result = proxy::parse_args(argv.iter().copied());
        let Err(reason) = result else {
            panic!("{argv:?} was accepted: {result:?}");
        };
        assert!(!reason.is_empty(), "{argv:?}");
    }
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

#[cfg(feature = "redis")]
#[tokio::test]
async fn with_redis_the_entry_is_in_redis_after_the_first_get() {
    let redis = support::RedisProcess::start_async().await;
    let upstream = Upstream::start().await;
    let redis_url = redis.url();
    let proxy = Proxy::for_upstream(&upstream, &["--redis", redis_url.as_str()]).await;

    let first = get_path(&proxy, "/max-age").await;
    assert!(
        first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    // A Redis fill finishes in the background: wait for it, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    let keys = loop {
        // Entries only: `tf:inflight` holds the leases of running rebuilds.
        let keys = redis.keys_matching("tf:/*").await;
        if !keys.is_empty() || tokio::time::Instant::now() >= deadline {
            break keys;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("tf:/max-age#"), "{keys:?}");

    let second = get_path(&proxy, "/max-age").await;
    assert!(second.is_hit(), "{}", second.cache_status());
    assert_eq!(second.text(), "call 1");
    assert_eq!(upstream.calls(), 1);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn an_unreachable_redis_stops_the_proxy_at_start() {
    let args = proxy::parse_args([
        "--upstream".to_owned(),
        "http://127.0.0.1:1".to_owned(),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--redis".to_owned(),
        format!("redis://127.0.0.1:{}", closed_port()),
    ])
    .unwrap();
    let run = proxy::run_until(
        args,
        |_| panic!("must not get ready"),
        std::future::pending(),
    );
    let result = tokio::time::timeout(WAIT, run)
        .await
        .expect("run_until gives up on Redis within the timeout");
    let err = result.expect_err("no Redis, no proxy");
    assert!(err.to_string().contains("Redis"), "{err}");
}

// ---------------------------------------------------------------------------
// The purge endpoint
// ---------------------------------------------------------------------------

const SECRET: &str = "correct-horse-battery-staple";

async fn purge(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::builder()
        .method(http::Method::from_bytes(b"PURGE").unwrap())
        .uri(proxy.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request.body(empty()).unwrap()).await
}

const AUTH: (&str, &str) = ("authorization", "Bearer correct-horse-battery-staple");

#[tokio::test]
async fn purge_needs_the_secret_and_purges_a_path_a_prefix_or_tags() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--purge-secret", SECRET]).await;
    for path in ["/tagged/1", "/tagged/2", "/max-age"] {
        get_path(&proxy, path).await;
        assert!(get_path(&proxy, path).await.is_hit(), "{path}");
    }
    assert_eq!(upstream.calls(), 3);

    // No secret, another secret, another scheme: 401, nothing purged, the
    // upstream never asked.
    for headers in [
        vec![],
        vec![("authorization", "Bearer correct-horse-battery-stapler")],
        vec![("authorization", "Basic Y29ycmVjdA==")],
    ] {
        let refused = purge(&proxy, "/tagged/1", &headers).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert!(refused.headers.contains_key(header::WWW_AUTHENTICATE));
    }
    assert!(get_path(&proxy, "/tagged/1").await.is_hit());
    assert_eq!(upstream.calls(), 3);

    // A path: that one only.
    let purged = purge(&proxy, "/tagged/1", &[AUTH]).await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.text());
    assert!(
        purged.text().contains("path /tagged/1"),
        "{}",
        purged.text()
    );
    assert!(!get_path(&proxy, "/tagged/1").await.is_hit());
    assert!(get_path(&proxy, "/tagged/2").await.is_hit());
    assert_eq!(upstream.calls(), 4);

    // A prefix.
    let purged = purge(&proxy, "/tagged", &[AUTH, ("purge-scope", "prefix")]).await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.text());
    assert!(!get_path(&proxy, "/tagged/2").await.is_hit());
    assert!(get_path(&proxy, "/max-age").await.is_hit());
    assert_eq!(upstream.calls(), 5);

    // Tags (the tag header never reached the client).
    get_path(&proxy, "/tagged/1").await;
    let hit = get_path(&proxy, "/tagged/1").await;
    assert!(hit.is_hit());
    assert!(!hit.headers.contains_key("surrogate-key"));
    let purged = purge(&proxy, "/", &[AUTH, ("purge-tag", "items")]).await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.text());
    assert!(!get_path(&proxy, "/tagged/1").await.is_hit());
    assert!(!get_path(&proxy, "/tagged/2").await.is_hit());
    assert!(get_path(&proxy, "/max-age").await.is_hit());

    // A request it cannot read.
    let bad = purge(&proxy, "/", &[AUTH, ("purge-scope", "everything")]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    proxy.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------
// A local tier in front of Redis
// ---------------------------------------------------------------------------

#[cfg(feature = "redis")]
#[test]
fn parse_args_reads_the_local_tier() {
    let args = proxy::parse_args([
        "--upstream",
        "http://a:1",
        "--redis",
        "redis://127.0.0.1:6380",
        "--local-tier",
        "1048576",
        "--local-tier-ttl",
        "5",
    ])
    .unwrap();
    assert_eq!(args.local_tier, Some((1_048_576, Duration::from_secs(5))));
    #[cfg(feature = "cluster")]
    {
        let args = proxy::parse_args([
            "--upstream",
            "http://a:1",
            "--redis-cluster",
            "redis://127.0.0.1:7000",
            "--local-tier=4096",
        ])
        .unwrap();
        assert_eq!(args.local_tier, Some((4096, Duration::from_secs(2))));
    }
    let defaults = proxy::parse_args(["--upstream", "http://a:1"]).unwrap();
    assert_eq!(defaults.local_tier, None);

    for bad in [
        // Process memory is local already.
        &["--local-tier", "4096"][..],
        &["--redis", "redis://a:1", "--local-tier", "0"][..],
        &["--redis", "redis://a:1", "--local-tier", "-1"][..],
        &["--redis", "redis://a:1", "--local-tier", "4k"][..],
        &[
            "--redis",
            "redis://a:1",
            "--local-tier",
            "4096",
            "--local-tier-ttl",
            "0",
        ][..],
        &[
            "--redis",
            "redis://a:1",
            "--local-tier",
            "4096",
            "--local-tier-ttl",
            "1.5",
        ][..],
        &["--redis", "redis://a:1", "--local-tier-ttl", "5"][..],
    ] {
        let mut argv = vec!["--upstream", "http://a:1"];
        argv.extend_from_slice(bad);
        let result = proxy::parse_args(argv.iter().copied());
        let Err(reason) = result else {
            panic!("{bad:?} was accepted: {result:?}");
        };
        assert!(reason.contains("--local-tier"), "{bad:?}: {reason}");
    }
}

/// The public host every request of the local-tier test names, so that
/// proxies on different ports share their entries.
#[cfg(feature = "redis")]
const SITE: &str = "site.example";

#[cfg(feature = "redis")]
async fn get_site(proxy: &Proxy, path: &str) -> Reply {
    let request = Request::get(proxy.url(path)).header(header::HOST, SITE);
    send(request.body(empty()).unwrap()).await
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn with_a_local_tier_hits_skip_redis_and_a_purge_reaches_every_proxy() {
    let redis = support::RedisProcess::start_async().await;
    let upstream = Upstream::start().await;
    let url = redis.url();
    // Copies live ten minutes: within this test only the fill feed can
    // drop one.
    let tier = [
        "--redis",
        url.as_str(),
        "--local-tier",
        "1048576",
        "--local-tier-ttl",
        "600",
    ];
    let a = Proxy::for_upstream(&upstream, &tier).await;
    let mut purging = tier.to_vec();
    purging.extend(["--purge-secret", SECRET]);
    let b = Proxy::for_upstream(&upstream, &purging).await;

    let first = get_site(&a, "/max-age").await;
    assert_eq!(first.text(), "call 1", "{}", first.cache_status());
    // The fill lands in Redis in the background: wait for it, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    while redis.keys_matching("tf:/max-age#*").await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no fill in Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A proxy keeps copies once its feed is read: wait for that, bounded.
    // Then ten hits on A send Redis at most one `GET` (the read that kept
    // the copy).
    loop {
        redis.reset_stats().await;
        for _ in 0..10 {
            let hit = get_site(&a, "/max-age").await;
            assert!(hit.is_hit(), "{}", hit.cache_status());
            assert_eq!(hit.text(), "call 1");
        }
        let gets = redis.command_calls("get").await;
        if gets <= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's local tier never answered: {gets} GETs for 10 hits"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let on_b = get_site(&b, "/max-age").await;
    assert!(on_b.is_hit(), "{}", on_b.cache_status());
    assert_eq!(on_b.text(), "call 1");
    assert_eq!(upstream.calls(), 1);

    // A purge through B: B's own copy is gone before it answers...
    let purged = purge(&b, "/max-age", &[AUTH, ("host", SITE)]).await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.text());
    let after = get_site(&b, "/max-age").await;
    assert_eq!(after.text(), format!("call {}", upstream.calls()));
    assert_ne!(after.text(), "call 1");
    // ...and A's goes when A reads the change from the feed: A answers
    // with the origin's current version well before its copy's ten
    // minutes are up.
    loop {
        let on_a = get_site(&a, "/max-age").await;
        if on_a.text() != "call 1" {
            assert_eq!(on_a.text(), format!("call {}", upstream.calls()));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A still serves its copy after the purge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_a_secret_purge_is_just_another_request() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;
    get_path(&proxy, "/max-age").await;
    let forwarded = purge(&proxy, "/max-age", &[AUTH]).await;
    // The upstream answers it (axum: 405 for a method it has no route
    // for); a 4xx invalidates nothing.
    assert_eq!(forwarded.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(get_path(&proxy, "/max-age").await.is_hit());
}

#[tokio::test]
async fn a_soft_purge_through_the_endpoint_serves_stale_while_it_refreshes() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--purge-secret", SECRET, "--grace", "60"]).await;
    assert_eq!(get_path(&proxy, "/max-age").await.text(), "call 1");
    let purged = purge(&proxy, "/max-age", &[AUTH, ("purge-mode", "soft")]).await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.text());
    assert!(purged.text().contains("(soft)"), "{}", purged.text());
    let stale = get_path(&proxy, "/max-age").await;
    assert_eq!(stale.text(), "call 1");
    assert!(
        stale.cache_status().contains("stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = get_path(&proxy, "/max-age").await;
        if reply.text() == "call 2" && reply.is_hit() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "refreshed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.calls(), 2);
}

#[test]
fn a_short_purge_secret_stops_the_proxy() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let args = Proxy::args(&[
            "--upstream",
            "http://127.0.0.1:1",
            "--purge-secret",
            "short",
        ]);
        let run = proxy::run_until(
            args,
            |_| panic!("must not get ready"),
            std::future::pending(),
        );
        let err = tokio::time::timeout(WAIT, run).await.unwrap().unwrap_err();
        assert!(err.to_string().contains("purge secret"), "{err}");
    });
}

// ---------------------------------------------------------------------------
// An upstream that goes away, and interim responses
// ---------------------------------------------------------------------------

/// An upstream on a raw socket: answers each connection with the next of
/// `answers` (bytes as they go on the wire), then closes it. Dropped, it
/// stops listening: connections are refused.
struct RawUpstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    async fn start(answers: Vec<&'static str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let task = tokio::spawn(async move {
            let mut answers = answers.into_iter();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let answer = answers.next();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    match answer {
                        Some(answer) => {
                            let _ = stream.write_all(answer.as_bytes()).await;
                            let _ = stream.shutdown().await;
                        }
                        // Out of answers: hold the connection, answer nothing.
                        None => std::future::pending::<()>().await,
                    }
                });
            }
        });
        RawUpstream { addr, calls, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const FRESH_FOR_A_SECOND: &str = "HTTP/1.1 200 OK\r\ncache-control: max-age=1\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
const MUST_REVALIDATE: &str = "HTTP/1.1 200 OK\r\ncache-control: max-age=1, must-revalidate\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";

/// The proxy for `upstream` on a manual clock.
async fn proxy_on_manual_clock(upstream: &str, extra: &[&str]) -> (Proxy, tower_fence::Clock) {
    let mut argv = vec!["--upstream", upstream];
    argv.extend_from_slice(extra);
    let mut args = Proxy::args(&argv);
    let clock = tower_fence::Clock::manual();
    args.clock = clock.clone();
    (Proxy::start_args(args).await, clock)
}

#[tokio::test]
async fn an_unreachable_upstream_gets_the_stale_entry() {
    let upstream = RawUpstream::start(vec![FRESH_FOR_A_SECOND]).await;
    let url = upstream.url();
    let (proxy, clock) = proxy_on_manual_clock(&url, &[]).await;
    assert_eq!(get_path(&proxy, "/page").await.text(), "hello");
    drop(upstream); // connections are refused from now on
    clock.advance(Duration::from_secs(30));
    let stale = get_path(&proxy, "/page").await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.text(), "hello");
    assert!(
        stale.cache_status().contains("detail=origin-unreachable"),
        "{}",
        stale.cache_status()
    );
    // Another path, never cached: the 502 itself.
    let missing = get_path(&proxy, "/other").await;
    assert_eq!(missing.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn must_revalidate_forbids_the_stale_entry_when_unreachable() {
    let upstream = RawUpstream::start(vec![MUST_REVALIDATE]).await;
    let url = upstream.url();
    let (proxy, clock) = proxy_on_manual_clock(&url, &[]).await;
    assert_eq!(get_path(&proxy, "/page").await.text(), "hello");
    drop(upstream);
    clock.advance(Duration::from_secs(30));
    let refused = get_path(&proxy, "/page").await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn a_timed_out_upstream_gets_the_stale_entry_or_504() {
    // One answer; the next connection is held open and never answered.
    let upstream = RawUpstream::start(vec![FRESH_FOR_A_SECOND]).await;
    let url = upstream.url();
    let (proxy, clock) = proxy_on_manual_clock(&url, &["--upstream-timeout", "1"]).await;
    assert_eq!(get_path(&proxy, "/page").await.text(), "hello");
    clock.advance(Duration::from_secs(30));
    let stale = get_path(&proxy, "/page").await;
    assert_eq!(stale.text(), "hello");
    assert!(
        stale.cache_status().contains("detail=origin-unreachable"),
        "{}",
        stale.cache_status()
    );
    let timed_out = get_path(&proxy, "/other").await;
    assert_eq!(timed_out.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test]
async fn interim_responses_are_dropped_and_never_stored() {
    let upstream = RawUpstream::start(vec![concat!(
        "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 5\r\n",
        "connection: close\r\n\r\nhello"
    )])
    .await;
    let proxy = Proxy::for_upstream_url(&upstream.url(), &[]).await;
    let raw = raw_exchange(
        &proxy,
        "GET /hints HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&raw), 200, "{raw}");
    assert!(!raw.contains("103"), "{raw}");
    assert!(raw.ends_with("hello"), "{raw}");
    let hit = raw_exchange(
        &proxy,
        "GET /hints HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&hit), 200, "{hit}");
    assert!(hit.contains("tower-fence; hit"), "{hit}");
    assert!(hit.ends_with("hello"), "{hit}");
    assert_eq!(upstream.calls(), 1);
}

// ---------------------------------------------------------------------------
// Operator options
// ---------------------------------------------------------------------------

#[test]
fn parse_args_reads_operator_options() {
    let args = proxy::parse_args([
        "--upstream",
        "http://a:1",
        "--grace",
        "30",
        "--stale-if-error",
        "600",
        "--keep",
        "7200",
        "--upstream-timeout",
        "5",
        "--max-body-size",
        "2048",
        "--heuristic",
        "0.1",
        "--heuristic-cap",
        "3600",
        "--namespace",
        "site-a:",
        "--purge-secret",
        SECRET,
        "--soft-purge",
    ])
    .unwrap();
    assert_eq!(args.grace, Duration::from_secs(30));
    assert_eq!(args.stale_if_error, Duration::from_secs(600));
    assert_eq!(args.keep, Duration::from_secs(7200));
    assert_eq!(args.upstream_timeout, Duration::from_secs(5));
    assert_eq!(args.max_body_size, 2048);
    assert_eq!(args.heuristic, Some((0.1, Duration::from_secs(3600))));
    assert_eq!(args.namespace, "site-a:");
    assert_eq!(args.purge_secret.as_deref(), Some(SECRET));
    assert!(args.soft_purge);

    let defaults = proxy::parse_args(["--upstream", "http://a:1"]).unwrap();
    assert_eq!(defaults.grace, Duration::ZERO);
    assert_eq!(defaults.keep, Duration::from_secs(3600));
    assert_eq!(defaults.upstream_timeout, Duration::from_secs(60));
    assert_eq!(defaults.max_body_size, tower_fence::DEFAULT_MAX_BODY_SIZE);
    assert_eq!(defaults.heuristic, None);
    assert_eq!(defaults.namespace, "tf:");
    assert_eq!(defaults.purge_secret, None);
    assert!(!defaults.soft_purge);
    assert_eq!(defaults.redis_cluster, None);

    for bad in [
        &["--heuristic", "0"][..],
        &["--heuristic", "1.5"][..],
        &["--heuristic", "NaN"][..],
        &["--upstream-timeout", "0"][..],
        &["--max-body-size", "-1"][..],
        &["--grace", "soon"][..],
        &["--soft-purge=yes"][..],
        &["--redis", "redis://a:1", "--redis-cluster", "redis://b:1"][..],
    ] {
        let mut argv = vec!["--upstream", "http://a:1"];
        argv.extend_from_slice(bad);
        let result = proxy::parse_args(argv.iter().copied());
        assert!(result.is_err(), "{bad:?} was accepted: {result:?}");
    }
}

#[test]
fn help_lists_every_option_with_its_default() {
    for option in proxy::VALUE_OPTIONS.iter().chain(&proxy::SWITCHES) {
        let line = proxy::USAGE
            .lines()
            .position(|line| line.trim_start().starts_with(option))
            .unwrap_or_else(|| panic!("{option} is not in --help"));
        // The option's description, up to the next option, names a default
        // (or says it is required).
        let described: String = proxy::USAGE
            .lines()
            .skip(line)
            .take_while({
                let mut first = true;
                move |l| std::mem::take(&mut first) || !l.trim_start().starts_with('-')
            })
            .collect();
        assert!(
            described.contains("default") || described.contains("required"),
            "{option}: {described}"
        );
    }
}

// ---------------------------------------------------------------------------
// Ranges and variants on the wire
// ---------------------------------------------------------------------------

async fn get_with(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::get(proxy.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request.body(empty()).unwrap()).await
}

#[tokio::test]
async fn a_range_is_cut_from_the_full_response_fetched_once() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &["--default-ttl", "60"]).await;
    // The upstream echoes the request it got: it must not have seen Range.
    let first = get_with(&proxy, "/headers", &[("range", "bytes=0-")]).await;
    assert_eq!(
        first.status,
        StatusCode::PARTIAL_CONTENT,
        "{}",
        first.text()
    );
    assert!(!first.text().contains("range:"), "{}", first.text());
    let full_len = first.body.len();
    assert_eq!(
        first.headers[header::CONTENT_RANGE],
        format!("bytes 0-{}/{full_len}", full_len - 1).as_str()
    );
    // Another range: a hit, sliced from the stored body.
    let slice = get_with(&proxy, "/headers", &[("range", "bytes=0-3")]).await;
    assert_eq!(slice.status, StatusCode::PARTIAL_CONTENT);
    assert!(slice.is_hit(), "{}", slice.cache_status());
    assert_eq!(slice.text(), "uri:");
    assert_eq!(slice.headers[header::CONTENT_LENGTH], "4");
    // Unsatisfiable.
    let beyond = get_with(&proxy, "/headers", &[("range", "bytes=999999-")]).await;
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    // The whole one, with Accept-Ranges.
    let whole = get_path(&proxy, "/headers").await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.headers[header::ACCEPT_RANGES], "bytes");
    assert_eq!(whole.body.len(), full_len);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn browser_accept_encodings_share_a_normalised_variant() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::for_upstream(&upstream, &[]).await;
    let first = get_with(
        &proxy,
        "/encoded",
        &[("accept-encoding", "gzip, deflate, br, zstd")],
    )
    .await;
    assert_eq!(first.text(), "br", "the upstream got the normalised value");
    for other in [
        "br, gzip",
        "gzip,deflate,br",
        "br;q=1.0, gzip;q=0.8, *;q=0.1",
    ] {
        let again = get_with(&proxy, "/encoded", &[("accept-encoding", other)]).await;
        assert!(again.is_hit(), "{other}: {}", again.cache_status());
        assert_eq!(again.text(), "br", "{other}");
    }
    let gzip = get_with(&proxy, "/encoded", &[("accept-encoding", "gzip, deflate")]).await;
    assert_eq!(gzip.text(), "gzip");
    assert_eq!(upstream.calls(), 2);
}
