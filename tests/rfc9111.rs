//! RFC 9111 shared-cache behaviour, end to end and table-driven.
//!
//! Each case scripts an axum upstream (a function from the request it sees
//! to the response it gives), starts the caching proxy of
//! `examples/proxy.rs` in front of it (memory store, `--default-ttl 0`
//! unless the case says otherwise), and plays a sequence of requests over
//! real HTTP on loopback. Every step states what the client must get
//! (status, headers, body, whether `Cache-Status` says `hit`) and how many
//! requests the upstream has served so far; a step may also check the
//! headers of the request that reached the upstream (conditional requests).
//!
//! Every response must carry a `Cache-Status` whose last member is
//! tower-fence's, whatever the step expects.
//!
//! Time is a [`Clock::manual`] that only the steps move: the cache reads it,
//! the upstream's `Date` comes from it, and a step that lets entries age
//! (`after_ms`) advances it instead of sleeping, so nothing here waits for
//! the wall clock. The clock starts on a whole second, so a `Date` from it is
//! exact and a response lives exactly as long as its `max-age` says. Only
//! the cache's notion of "now" is moved: the memory store's own expiry runs
//! on real time, so an entry past its lifetime is still found (and judged
//! stale by its times) where, with sleeps, it would be gone.

#[path = "../examples/proxy.rs"]
#[allow(dead_code)] // `main`, `run` and the signal handling are the binary's.
mod proxy;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use axum::Router;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower_fence::Clock;

/// Generous bound on anything a step waits for.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The scripted upstream
// ---------------------------------------------------------------------------

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    /// 1 for the first request with this method and path, 2 for the next…
    n: usize,
    /// The case's clock when the request arrived.
    now: SystemTime,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The response the upstream gives.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn new(status: u16) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    fn ok(body: impl Into<String>) -> Self {
        Answer::new(200).body(body)
    }

    fn h(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = StatusCode::from_u16(self.status).expect("a valid status");
        for (name, value) in self.headers {
            // `from_bytes`, not `from_str`: a case may send bytes that are
            // not visible ASCII (obs-text), as origins do.
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
                HeaderValue::from_bytes(value.as_bytes()).expect("a valid header value"),
            );
        }
        response
    }
}

/// How the upstream answers a case's requests.
type Origin = fn(&Seen) -> Answer;

struct UpstreamState {
    origin: Origin,
    log: Mutex<Vec<Seen>>,
    clock: Clock,
}

/// An axum app on a free loopback port that answers with the case's
/// [`Origin`] and logs every request it gets. Its `Date` is the case's
/// clock, not the wall clock (hyper adds one only to a response without).
struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start(origin: Origin, clock: Clock) -> Self {
        let state = Arc::new(UpstreamState {
            origin,
            log: Mutex::new(Vec::new()),
            clock,
        });
        let app = Router::new().fallback(scripted).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let addr = listener.local_addr().expect("the upstream's address");
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("serve the upstream");
        });
        Upstream { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> Vec<Seen> {
        self.state.log.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scripted(
    State(state): State<Arc<UpstreamState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let seen = {
        let mut log = state.log.lock().unwrap();
        let path = uri.path().to_owned();
        let n = 1 + log
            .iter()
            .filter(|s| s.method == method && s.path == path)
            .count();
        let seen = Seen {
            method,
            path,
            headers,
            n,
            now: state.clock.now(),
        };
        log.push(seen.clone());
        seen
    };
    let mut response = (state.origin)(&seen).into_response();
    if !response.headers().contains_key(http::header::DATE) {
        let date = httpdate::fmt_http_date(seen.now);
        response.headers_mut().insert(
            http::header::DATE,
            HeaderValue::from_str(&date).expect("an HTTP date is a valid header value"),
        );
    }
    response
}

/// An HTTP date `offset` seconds from when `seen` arrived (the case's clock).
fn http_date(seen: &Seen, offset: i64) -> String {
    let now = seen.now;
    let at = if offset >= 0 {
        now + Duration::from_secs(offset.unsigned_abs())
    } else {
        now - Duration::from_secs(offset.unsigned_abs())
    };
    httpdate::fmt_http_date(at)
}

/// `v1`, `v2`… with `cache-control: cc`: which upstream call a body came from.
fn versioned(seen: &Seen, cc: &str) -> Answer {
    Answer::ok(format!("v{}", seen.n)).h("cache-control", cc)
}

/// An origin with the validator `"v1"`: it answers a request that carries
/// `If-None-Match: "v1"` with `304` (`cc_304`, `x-version: 2`), any other
/// with `200` (`cc_200`, `x-version: 1`, body `payload v<n>`).
fn etagged(seen: &Seen, cc_200: &str, cc_304: &str) -> Answer {
    if seen.header("if-none-match") == Some("\"v1\"") {
        return Answer::new(304)
            .h("etag", "\"v1\"")
            .h("cache-control", cc_304)
            .h("x-version", "2");
    }
    Answer::ok(format!("payload v{}", seen.n))
        .h("etag", "\"v1\"")
        .h("cache-control", cc_200)
        .h("x-version", "1")
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
    async fn start(upstream: &Upstream, default_ttl: u64, clock: Clock) -> Self {
        let argv = [
            "--upstream".to_owned(),
            upstream.url(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--default-ttl".to_owned(),
            default_ttl.to_string(),
        ];
        let mut args = proxy::parse_args(argv).expect("valid arguments");
        args.clock = clock;
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
        Proxy {
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

/// What a header must be.
#[derive(Debug, Clone)]
enum H {
    Present,
    Absent,
    Eq(&'static str),
    /// A whole number no smaller than this.
    AtLeast(u64),
}

/// One request and what must come of it.
#[derive(Debug, Clone)]
struct Step {
    method: Method,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    /// Move the case's clock this far before sending.
    after: Duration,
    status: u16,
    /// Whether `Cache-Status` must start with `tower-fence; hit`.
    hit: Option<bool>,
    body: Option<&'static str>,
    response_headers: Vec<(&'static str, H)>,
    /// Substrings `Cache-Status` must contain.
    cache_status: Vec<&'static str>,
    /// Requests the upstream has served once this step is done.
    calls: Option<usize>,
    /// Headers of the last request the upstream got (this step must have
    /// sent one).
    upstream_headers: Vec<(&'static str, H)>,
}

fn step(method: Method, path: &'static str) -> Step {
    Step {
        method,
        path,
        headers: Vec::new(),
        after: Duration::ZERO,
        status: 200,
        hit: None,
        body: None,
        response_headers: Vec::new(),
        cache_status: Vec::new(),
        calls: None,
        upstream_headers: Vec::new(),
    }
}

fn get(path: &'static str) -> Step {
    step(Method::GET, path)
}

fn head(path: &'static str) -> Step {
    step(Method::HEAD, path)
}

fn post(path: &'static str) -> Step {
    step(Method::POST, path)
}

fn delete(path: &'static str) -> Step {
    step(Method::DELETE, path)
}

impl Step {
    /// Sends the request header `name: value`.
    fn h(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Moves the case's clock `ms` milliseconds on before sending.
    fn after_ms(mut self, ms: u64) -> Self {
        self.after = Duration::from_millis(ms);
        self
    }

    fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    fn hit(mut self) -> Self {
        self.hit = Some(true);
        self
    }

    fn miss(mut self) -> Self {
        self.hit = Some(false);
        self
    }

    fn body(mut self, body: &'static str) -> Self {
        self.body = Some(body);
        self
    }

    fn no_body(self) -> Self {
        self.body("")
    }

    fn has(mut self, name: &'static str) -> Self {
        self.response_headers.push((name, H::Present));
        self
    }

    fn lacks(mut self, name: &'static str) -> Self {
        self.response_headers.push((name, H::Absent));
        self
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.response_headers.push((name, H::Eq(value)));
        self
    }

    fn header_at_least(mut self, name: &'static str, min: u64) -> Self {
        self.response_headers.push((name, H::AtLeast(min)));
        self
    }

    /// `Cache-Status` contains `part`.
    fn cs(mut self, part: &'static str) -> Self {
        self.cache_status.push(part);
        self
    }

    fn calls(mut self, calls: usize) -> Self {
        self.calls = Some(calls);
        self
    }

    fn upstream_got(mut self, name: &'static str, value: &'static str) -> Self {
        self.upstream_headers.push((name, H::Eq(value)));
        self
    }

    fn upstream_lacks(mut self, name: &'static str) -> Self {
        self.upstream_headers.push((name, H::Absent));
        self
    }
}

/// A scripted upstream, the proxy's `--default-ttl`, and the steps.
struct Case {
    origin: Origin,
    default_ttl: u64,
    steps: Vec<Step>,
}

impl Case {
    fn new(origin: Origin, steps: Vec<Step>) -> Self {
        Case {
            origin,
            default_ttl: 0,
            steps,
        }
    }

    fn default_ttl(mut self, secs: u64) -> Self {
        self.default_ttl = secs;
        self
    }
}

// ---------------------------------------------------------------------------
// The runner
// ---------------------------------------------------------------------------

type ClientBody = BoxBody<Bytes, Infallible>;

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
            .map(|v| v.to_str().unwrap_or("<not text>").to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The last `Cache-Status` member: the one closest to the client.
    fn own_status(&self) -> String {
        let all = self.cache_status();
        all.rsplit(", ")
            .next()
            .map(str::to_owned)
            .unwrap_or_default()
    }
}

async fn exchange(client: &Client<HttpConnector, ClientBody>, req: Request<ClientBody>) -> Reply {
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

fn check_header(
    problems: &mut Vec<String>,
    whose: &str,
    headers: &HeaderMap,
    name: &str,
    want: &H,
) {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("<not text>"))
        .collect();
    let ok = match want {
        H::Present => !values.is_empty(),
        H::Absent => values.is_empty(),
        H::Eq(value) => values == [*value],
        H::AtLeast(min) => values.len() == 1 && values[0].parse::<u64>().is_ok_and(|v| v >= *min),
    };
    if !ok {
        problems.push(format!("{whose} {name}: want {want:?}, got {values:?}"));
    }
}

/// Plays `case` against a fresh upstream and proxy; panics with every
/// unmet expectation of the first failing step.
async fn run(name: &str, case: Case) {
    let clock = Clock::manual();
    let upstream = Upstream::start(case.origin, clock.clone()).await;
    let proxy = Proxy::start(&upstream, case.default_ttl, clock.clone()).await;
    let client: Client<HttpConnector, ClientBody> =
        Client::builder(TokioExecutor::new()).build_http();

    for (i, step) in case.steps.iter().enumerate() {
        clock.advance(step.after);
        let calls_before = upstream.log().len();
        let mut req = Request::builder()
            .method(step.method.clone())
            .uri(proxy.url(step.path));
        for (n, v) in &step.headers {
            req = req.header(*n, *v);
        }
        let req = req
            .body(Empty::<Bytes>::new().boxed())
            .expect("a valid request");
        let reply = exchange(&client, req).await;
        let log = upstream.log();

        let mut problems = Vec::new();
        if reply.status.as_u16() != step.status {
            problems.push(format!(
                "status: want {}, got {}",
                step.status, reply.status
            ));
        }
        let own = reply.own_status();
        if !own.starts_with("tower-fence") {
            problems.push(format!(
                "cache-status: want a tower-fence member last, got {:?}",
                reply.cache_status()
            ));
        }
        if let Some(hit) = step.hit {
            if own.starts_with("tower-fence; hit") != hit {
                let want = if hit { "a hit" } else { "not a hit" };
                problems.push(format!("cache-status: want {want}, got {own:?}"));
            }
        }
        for part in &step.cache_status {
            if !own.contains(part) {
                problems.push(format!("cache-status: want {part:?} in {own:?}"));
            }
        }
        if let Some(body) = step.body {
            if reply.body != body.as_bytes() {
                problems.push(format!(
                    "body: want {body:?}, got {:?}",
                    String::from_utf8_lossy(&reply.body)
                ));
            }
        }
        for (name, want) in &step.response_headers {
            check_header(&mut problems, "response", &reply.headers, name, want);
        }
        if let Some(calls) = step.calls {
            if log.len() != calls {
                problems.push(format!("upstream calls: want {calls}, got {}", log.len()));
            }
        }
        if !step.upstream_headers.is_empty() {
            match log.last().filter(|_| log.len() > calls_before) {
                None => problems.push("upstream: want a request from this step, got none".into()),
                Some(seen) => {
                    for (name, want) in &step.upstream_headers {
                        check_header(&mut problems, "upstream request", &seen.headers, name, want);
                    }
                }
            }
        }

        if !problems.is_empty() {
            let seen: Vec<String> = log
                .iter()
                .map(|s| format!("{} {} #{} {:?}", s.method, s.path, s.n, s.headers))
                .collect();
            panic!(
                "case {name}, step {} ({} {} {:?}):\n  {}\n\n\
                 reply: {} {:?}\nbody: {:?}\nupstream log:\n  {}",
                i + 1,
                step.method,
                step.path,
                step.headers,
                problems.join("\n  "),
                reply.status,
                reply.headers,
                String::from_utf8_lossy(&reply.body),
                seen.join("\n  ")
            );
        }
    }
}

/// One `#[tokio::test]` per case, so that a case can be ignored alone.
macro_rules! cases {
    ($($(#[$attr:meta])* $name:ident => $case:expr;)*) => {
        $(
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run(stringify!($name), $case).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------
// Freshness (RFC 9111 §4.2)
// ---------------------------------------------------------------------------

cases! {
    max_age_is_served_from_cache => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").miss().body("v1").cs("fwd=uri-miss").cs("stored").calls(1),
            get("/r").hit().body("v1").has("age").header("cache-control", "max-age=60").calls(1),
        ],
    );

    s_maxage_outlives_a_shorter_max_age => Case::new(
        |s| versioned(s, "max-age=1, s-maxage=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").after_ms(2_500).hit().body("v1").calls(1),
        ],
    );

    s_maxage_cuts_a_longer_max_age => Case::new(
        |s| versioned(s, "max-age=60, s-maxage=2"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").hit().body("v1").calls(1),
            get("/r").after_ms(3_000).miss().body("v2").calls(2),
        ],
    );

    expires_minus_date_is_the_lifetime => Case::new(
        |s| {
            // Both from one instant: exactly two seconds apart.
            let now = s.now;
            Answer::ok(format!("v{}", s.n))
                .h("date", httpdate::fmt_http_date(now))
                .h("expires", httpdate::fmt_http_date(now + Duration::from_secs(2)))
        },
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").hit().body("v1").calls(1),
            get("/r").after_ms(3_000).miss().body("v2").calls(2),
        ],
    );

    // RFC 9110 §5.6.7: all three date forms, names in any case, a day name
    // that does not match the date.
    lenient_dates_are_read => Case::new(
        |s| {
            let now = s.now;
            let date = httpdate::fmt_http_date(now);
            // The RFC 850 form, lower case, with a wrong day name.
            let later = httpdate::fmt_http_date(now + Duration::from_secs(2));
            let (_, rest) = later.split_once(", ").unwrap();
            let mut parts = rest.split(' ');
            let (day, month, year, time) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            let rfc850 = format!("someday, {day}-{month}-{} {time} gmt", &year[2..])
                .to_lowercase();
            Answer::ok(format!("v{}", s.n)).h("date", date).h("expires", rfc850)
        },
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").hit().body("v1").calls(1),
            get("/r").after_ms(3_000).miss().body("v2").calls(2),
        ],
    );

    expires_before_date_is_stale => Case::new(
        |s| Answer::ok(format!("v{}", s.n))
            .h("date", http_date(s, 0))
            .h("expires", http_date(s, -60)),
        vec![
            get("/r").miss().body("v1").cs("detail=stale").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    invalid_expires_zero_is_stale => Case::new(
        |s| Answer::ok(format!("v{}", s.n)).h("date", http_date(s, 0)).h("expires", "0"),
        vec![
            get("/r").miss().body("v1").cs("detail=stale").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    invalid_expires_date_is_stale => Case::new(
        |s| Answer::ok(format!("v{}", s.n)).h("expires", "next tuesday"),
        vec![
            get("/r").miss().body("v1").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    max_age_overrides_expires => Case::new(
        |s| versioned(s, "max-age=60").h("expires", "0"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").hit().body("v1").calls(1),
        ],
    );

    upstream_age_shortens_freshness => Case::new(
        |s| versioned(s, "max-age=62").h("age", "60"),
        vec![
            // Forwarded from the origin, the response keeps its `Age`.
            get("/r").miss().body("v1").cs("stored").header_at_least("age", 60).calls(1),
            get("/r").hit().body("v1").header_at_least("age", 60).calls(1),
            get("/r").after_ms(3_000).miss().body("v2").header_at_least("age", 60).calls(2),
        ],
    );

    upstream_age_beyond_max_age_is_not_stored => Case::new(
        |s| versioned(s, "max-age=60").h("age", "120"),
        vec![
            get("/r").miss().body("v1").cs("detail=stale").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    old_date_counts_as_age => Case::new(
        |s| versioned(s, "max-age=60").h("date", http_date(s, -120)),
        vec![
            get("/r").miss().body("v1").cs("detail=stale").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    s_maxage_zero_beats_max_age => Case::new(
        |s| versioned(s, "max-age=60, s-maxage=0"),
        vec![
            get("/r").miss().body("v1").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    directives_are_case_insensitive => Case::new(
        |s| versioned(s, "Public, MAX-AGE=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").hit().body("v1").calls(1),
        ],
    );

    cache_control_field_lines_are_combined => Case::new(
        |s| versioned(s, "max-age=60").h("cache-control", "private"),
        vec![
            get("/r").miss().body("v1").cs("detail=private").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    max_age_zero_is_not_served_from_cache => Case::new(
        |s| versioned(s, "max-age=0"),
        vec![
            get("/r").miss().body("v1").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    no_freshness_with_default_ttl_zero_is_not_stored => Case::new(
        |s| Answer::ok(format!("v{}", s.n)),
        vec![
            get("/r").miss().body("v1").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    no_freshness_with_a_default_ttl_is_stored => Case::new(
        |s| Answer::ok(format!("v{}", s.n)),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").hit().body("v1").calls(1),
        ],
    ).default_ttl(60);

    cdn_cache_control_max_age_beats_cache_control_no_store => Case::new(
        |s| versioned(s, "no-store").h("cdn-cache-control", "max-age=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").hit().body("v1").calls(1),
        ],
    );

    cdn_cache_control_no_store_beats_cache_control_max_age => Case::new(
        |s| versioned(s, "max-age=60").h("cdn-cache-control", "no-store"),
        vec![
            get("/r").miss().body("v1").cs("detail=no-store").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    // RFC 9213 §2.1: a Structured Field Dictionary, not a Cache-Control
    // list; one that is not makes nothing cacheable.
    cdn_cache_control_that_is_no_dictionary_stores_nothing => Case::new(
        |s| versioned(s, "no-store").h("cdn-cache-control", "max-age=10000, &&&&&"),
        vec![
            get("/r").miss().body("v1").cs("detail=cache-control").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    cdn_cache_control_seconds_must_be_an_integer => Case::new(
        |s| versioned(s, "no-store").h("cdn-cache-control", "max-age=\"10000\""),
        vec![
            get("/r").miss().body("v1").cs("detail=cache-control").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );
}

// ---------------------------------------------------------------------------
// Response directives and storability (RFC 9111 §3, §5.2.2)
// ---------------------------------------------------------------------------

cases! {
    no_store_is_not_stored => Case::new(
        |s| versioned(s, "max-age=60, no-store"),
        vec![
            get("/r").miss().body("v1").cs("detail=no-store").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    private_is_not_stored => Case::new(
        |s| versioned(s, "private, max-age=60"),
        vec![
            get("/r").miss().body("v1").cs("detail=private").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    private_next_to_a_non_ascii_byte_is_not_stored => Case::new(
        |s| versioned(s, "private, x=\"é\""),
        vec![
            get("/r").miss().body("v1").cs("detail=cache-control").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    ).default_ttl(60);

    unbalanced_quote_in_cache_control_is_not_stored => Case::new(
        |s| versioned(s, "max-age=60, no-cache=\"set-cookie"),
        vec![
            get("/r").miss().body("v1").cs("detail=cache-control").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );

    set_cookie_is_not_stored => Case::new(
        |s| versioned(s, "max-age=60").h("set-cookie", "session=abc"),
        vec![
            get("/r").miss().body("v1").header("set-cookie", "session=abc")
                .cs("detail=set-cookie").calls(1),
            get("/r").miss().body("v2").header("set-cookie", "session=abc").calls(2),
        ],
    );

    no_cache_with_max_age_is_revalidated_on_every_use => Case::new(
        |s| etagged(s, "no-cache, max-age=60", "no-cache, max-age=60"),
        vec![
            get("/r").miss().body("payload v1").cs("stored").calls(1)
                .upstream_lacks("if-none-match"),
            get("/r").miss().body("payload v1").calls(2)
                .upstream_got("if-none-match", "\"v1\""),
            get("/r").miss().body("payload v1").calls(3)
                .upstream_got("if-none-match", "\"v1\""),
        ],
    );

    no_cache_entry_answers_client_validators_after_revalidating => Case::new(
        |s| etagged(s, "no-cache, max-age=60", "no-cache, max-age=60"),
        vec![
            get("/r").miss().body("payload v1").cs("stored").calls(1),
            get("/r").h("if-none-match", "\"v1\"").status(304).no_body()
                .header("etag", "\"v1\"").calls(2)
                .upstream_got("if-none-match", "\"v1\""),
        ],
    );

    no_cache_entry_is_not_used_for_only_if_cached => Case::new(
        |s| etagged(s, "no-cache, max-age=60", "no-cache, max-age=60"),
        vec![
            get("/r").miss().body("payload v1").cs("stored").calls(1),
            get("/r").h("cache-control", "only-if-cached").status(504).calls(1),
        ],
    );

    no_cache_without_max_age_is_revalidated_on_every_use => Case::new(
        |s| etagged(s, "no-cache", "no-cache"),
        vec![
            get("/r").miss().body("payload v1").cs("stored").calls(1)
                .upstream_lacks("if-none-match"),
            get("/r").after_ms(50).miss().body("payload v1").calls(2)
                .upstream_got("if-none-match", "\"v1\""),
            get("/r").after_ms(50).miss().body("payload v1").calls(3)
                .upstream_got("if-none-match", "\"v1\""),
        ],
    );

    must_revalidate_is_not_served_stale => Case::new(
        |s| versioned(s, "max-age=2, must-revalidate, stale-if-error=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").after_ms(3_000).h("cache-control", "max-stale=60")
                .miss().body("v2").calls(2),
        ],
    );

    must_revalidate_is_not_served_stale_on_an_origin_error => Case::new(
        |s| match s.n {
            1 => versioned(s, "max-age=2, must-revalidate, stale-if-error=60"),
            _ => Answer::new(500).body("down"),
        },
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").after_ms(3_000).status(500).miss().body("down").calls(2),
        ],
    );

    stale_if_error_serves_the_stale_entry_on_an_origin_error => Case::new(
        |s| match s.n {
            1 => versioned(s, "max-age=2, stale-if-error=60"),
            _ => Answer::new(500).body("down"),
        },
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").after_ms(3_000).body("v1").cs("stale-if-error").calls(2),
        ],
    );
}

// ---------------------------------------------------------------------------
// Request directives (RFC 9111 §5.2.1, §5.4)
// ---------------------------------------------------------------------------

cases! {
    request_cache_control_that_does_not_parse_bypasses => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").h("cache-control", "max-stale, x=\"").miss().body("v2")
                .cs("fwd=bypass").cs("detail=cache-control").calls(2),
            get("/r").hit().body("v1").calls(2),
        ],
    );

    request_no_cache_is_forwarded_and_revalidated => Case::new(
        |s| etagged(s, "max-age=60", "max-age=60"),
        vec![
            get("/r").miss().body("payload v1").cs("stored").calls(1),
            get("/r").h("cache-control", "no-cache").miss().body("payload v1").calls(2)
                .upstream_got("if-none-match", "\"v1\""),
            get("/r").hit().body("payload v1").calls(2),
        ],
    );

    request_pragma_no_cache_is_forwarded_and_revalidated => Case::new(
        |s| etagged(s, "max-age=60", "max-age=60"),
        vec![
            get("/r").miss().body("payload v1").cs("stored").calls(1),
            get("/r").h("pragma", "no-cache").miss().body("payload v1").calls(2)
                .upstream_got("if-none-match", "\"v1\""),
            get("/r").hit().body("payload v1").calls(2),
        ],
    );

    request_max_age_zero_is_forwarded => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            // A millisecond on, as there always is on a real clock: an entry
            // stored this very millisecond is of age 0, which `max-age=0`
            // accepts (RFC 9111 §5.2.1.1: age no greater than the value).
            get("/r").after_ms(1).h("cache-control", "max-age=0")
                .miss().body("v2").calls(2),
        ],
    );

    request_max_age_below_the_age_is_forwarded => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").h("cache-control", "max-age=30").hit().body("v1").calls(1),
            get("/r").after_ms(2_100).h("cache-control", "max-age=1")
                .miss().body("v2").calls(2),
        ],
    );

    request_max_stale_serves_a_stale_entry => Case::new(
        |s| versioned(s, "max-age=2, stale-if-error=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").after_ms(3_000).h("cache-control", "max-stale=60")
                .hit().body("v1").cs("ttl=-").calls(1),
        ],
    );

    // Stale entries are kept past their freshness only when they can be
    // revalidated (a validator); such an entry serves `max-stale` too.
    request_max_stale_serves_a_stale_entry_without_stale_extensions => Case::new(
        |s| etagged(s, "max-age=2", "max-age=2"),
        vec![
            get("/r").miss().body("payload v1").cs("stored").calls(1),
            get("/r").after_ms(3_000).h("cache-control", "max-stale=60")
                .hit().body("payload v1").cs("ttl=-").calls(1),
        ],
    );

    request_max_stale_too_small_is_forwarded => Case::new(
        |s| versioned(s, "max-age=2, stale-if-error=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").after_ms(3_000).h("cache-control", "max-stale=0")
                .miss().body("v2").calls(2),
        ],
    );

    request_min_fresh_beyond_freshness_is_forwarded => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").h("cache-control", "min-fresh=10").hit().body("v1").calls(1),
            get("/r").h("cache-control", "min-fresh=120").miss().body("v2").calls(2),
        ],
    );

    request_only_if_cached_on_a_miss_is_504 => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").h("cache-control", "only-if-cached").status(504).miss()
                .cs("only-if-cached").calls(0),
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").h("cache-control", "only-if-cached").hit().body("v1").calls(1),
        ],
    );

    request_only_if_cached_with_a_stale_entry_is_504 => Case::new(
        |s| versioned(s, "max-age=2, stale-if-error=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").after_ms(3_000).h("cache-control", "only-if-cached")
                .status(504).miss().calls(1),
        ],
    );

    request_no_store_response_is_not_stored => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").h("cache-control", "no-store").miss().body("v1")
                .cs("detail=request-no-store").calls(1),
            get("/r").miss().body("v2").cs("stored").calls(2),
            get("/r").hit().body("v2").calls(2),
        ],
    );
}

// ---------------------------------------------------------------------------
// Validation (RFC 9110 §13, RFC 9111 §4.3)
// ---------------------------------------------------------------------------

cases! {
    if_none_match_matching_a_fresh_entry_is_304_from_cache => Case::new(
        |s| etagged(s, "max-age=60", "max-age=60"),
        vec![
            get("/r").miss().body("payload v1").cs("stored").calls(1),
            get("/r").h("if-none-match", "\"v1\"").status(304).hit().no_body()
                .header("etag", "\"v1\"").header("cache-control", "max-age=60")
                .has("age").calls(1),
            get("/r").h("if-none-match", "\"x\", W/\"v1\"").status(304).hit().no_body()
                .header("etag", "\"v1\"").calls(1),
        ],
    );

    if_none_match_not_matching_is_200_from_cache => Case::new(
        |s| etagged(s, "max-age=60", "max-age=60"),
        vec![
            get("/r").miss().body("payload v1").cs("stored").calls(1),
            get("/r").h("if-none-match", "\"other\"").hit().body("payload v1")
                .header("etag", "\"v1\"").calls(1),
        ],
    );

    if_none_match_on_a_miss_is_not_forwarded_but_answered => Case::new(
        |s| etagged(s, "max-age=60", "max-age=60"),
        vec![
            get("/r").h("if-none-match", "\"v1\"").status(304).miss().no_body()
                .upstream_lacks("if-none-match").calls(1),
            get("/r").hit().body("payload v1").calls(1),
        ],
    );

    if_modified_since_not_before_last_modified_is_304 => Case::new(
        |s| versioned(s, "max-age=60").h("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").h("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")
                .status(304).hit().no_body().calls(1),
            get("/r").h("if-modified-since", "Mon, 01 Jan 2024 00:00:00 GMT")
                .status(304).hit().no_body().calls(1),
            get("/r").h("if-modified-since", "Sun, 31 Dec 2023 00:00:00 GMT")
                .hit().body("v1").calls(1),
        ],
    );

    stale_entry_is_revalidated_and_the_304_headers_merged => Case::new(
        |s| etagged(s, "max-age=2, stale-if-error=60", "max-age=60"),
        vec![
            get("/r").miss().body("payload v1").header("x-version", "1").cs("stored").calls(1),
            get("/r").after_ms(3_000).miss().body("payload v1")
                .header("x-version", "2").header("cache-control", "max-age=60")
                .header("etag", "\"v1\"").cs("fwd=stale").calls(2)
                .upstream_got("if-none-match", "\"v1\""),
            get("/r").hit().body("payload v1").header("x-version", "2").calls(2),
        ],
    );

    revalidation_reports_the_304_as_fwd_status => Case::new(
        |s| etagged(s, "max-age=2, stale-if-error=60", "max-age=60"),
        vec![
            get("/r").miss().cs("fwd-status=200").calls(1),
            get("/r").after_ms(3_000).miss().body("payload v1")
                .cs("fwd=stale").cs("fwd-status=304").calls(2),
        ],
    );

    stale_entry_without_stale_extensions_is_revalidated => Case::new(
        |s| etagged(s, "max-age=2", "max-age=60"),
        vec![
            get("/r").miss().body("payload v1").header("x-version", "1").cs("stored").calls(1),
            get("/r").after_ms(3_000).miss().body("payload v1")
                .header("x-version", "2").header("cache-control", "max-age=60")
                .cs("fwd=stale").calls(2)
                .upstream_got("if-none-match", "\"v1\""),
            get("/r").hit().body("payload v1").header("x-version", "2").calls(2),
        ],
    );
}

// ---------------------------------------------------------------------------
// Vary (RFC 9111 §4.1)
// ---------------------------------------------------------------------------

cases! {
    vary_serves_only_the_matching_variant => Case::new(
        |s| {
            let lang = s.header("accept-language").unwrap_or("none").to_owned();
            Answer::ok(format!("{lang} v{}", s.n))
                .h("cache-control", "max-age=60")
                .h("vary", "Accept-Language")
        },
        vec![
            get("/r").h("accept-language", "en").miss().body("en v1").cs("stored").calls(1),
            get("/r").h("accept-language", "en").hit().body("en v1").calls(1),
            get("/r").h("accept-language", "fr").miss().body("fr v2").cs("vary-miss").calls(2),
            get("/r").h("accept-language", "fr").hit().body("fr v2").calls(2),
            get("/r").miss().body("none v3").cs("vary-miss").calls(3),
        ],
    );

    vary_star_is_never_stored => Case::new(
        |s| versioned(s, "max-age=60").h("vary", "*"),
        vec![
            get("/r").miss().body("v1").cs("detail=vary-star").calls(1),
            get("/r").miss().body("v2").calls(2),
        ],
    );
}

// ---------------------------------------------------------------------------
// Authorization (RFC 9111 §3.5)
// ---------------------------------------------------------------------------

cases! {
    authorized_response_without_permission_is_not_stored => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").h("authorization", "Bearer a").miss().body("v1")
                .cs("detail=authorization").calls(1),
            get("/r").h("authorization", "Bearer a").miss().body("v2").calls(2),
            get("/r").miss().body("v3").calls(3),
        ],
    );

    authorized_response_marked_public_is_stored => Case::new(
        |s| versioned(s, "public, max-age=60"),
        vec![
            get("/r").h("authorization", "Bearer a").miss().body("v1").cs("stored").calls(1),
            get("/r").h("authorization", "Bearer a").hit().body("v1").calls(1),
        ],
    );

    authorized_response_with_s_maxage_is_stored => Case::new(
        |s| versioned(s, "s-maxage=60"),
        vec![
            get("/r").h("authorization", "Bearer a").miss().body("v1").cs("stored").calls(1),
            get("/r").h("authorization", "Bearer a").hit().body("v1").calls(1),
        ],
    );

    anonymous_entry_is_not_served_to_an_authorized_request => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            get("/r").h("authorization", "Bearer a").miss().body("v2").calls(2),
            get("/r").hit().body("v1").calls(2),
        ],
    );
}

// ---------------------------------------------------------------------------
// Cookies: a response to a request with `Cookie` may be that user's page
// ---------------------------------------------------------------------------

/// `v<n> for <cookie>`: a page personalised by the session cookie.
fn personal(seen: &Seen, cc: &str) -> Answer {
    let page = Answer::ok(format!(
        "v{} for {}",
        seen.n,
        seen.header("cookie").unwrap_or("nobody")
    ));
    if cc.is_empty() {
        page
    } else {
        page.h("cache-control", cc)
    }
}

cases! {
    cookie_response_without_cache_control_is_not_shared => Case::new(
        |s| personal(s, ""),
        vec![
            get("/r").h("cookie", "session=a").miss().body("v1 for session=a")
                .cs("detail=cookie").calls(1),
            get("/r").h("cookie", "session=b").miss().body("v2 for session=b").calls(2),
            get("/r").miss().body("v3 for nobody").calls(3),
        ],
    ).default_ttl(60);

    cookie_response_with_max_age_or_must_revalidate_is_not_shared => Case::new(
        |s| personal(s, "max-age=60, must-revalidate"),
        vec![
            get("/r").h("cookie", "session=a").miss().body("v1 for session=a")
                .cs("detail=cookie").calls(1),
            get("/r").h("cookie", "session=b").miss().body("v2 for session=b").calls(2),
        ],
    );

    cookie_response_marked_public_is_shared => Case::new(
        |s| personal(s, "public, max-age=60"),
        vec![
            get("/r").h("cookie", "session=a").miss().body("v1 for session=a")
                .cs("stored").calls(1),
            get("/r").h("cookie", "session=b").hit().body("v1 for session=a").calls(1),
            get("/r").hit().body("v1 for session=a").calls(1),
        ],
    );

    anonymous_entry_is_not_served_to_a_cookie_request => Case::new(
        |s| personal(s, "max-age=60"),
        vec![
            get("/r").miss().body("v1 for nobody").cs("stored").calls(1),
            get("/r").h("cookie", "session=a").miss().body("v2 for session=a").calls(2),
            get("/r").hit().body("v1 for nobody").calls(2),
        ],
    );
}

// ---------------------------------------------------------------------------
// Status codes (RFC 9111 §3, §3.3)
// ---------------------------------------------------------------------------

cases! {
    not_found_with_max_age_is_cached => Case::new(
        |s| versioned(s, "max-age=60").body(format!("missing v{}", s.n)).status(404),
        vec![
            get("/r").status(404).miss().body("missing v1").cs("stored").calls(1),
            get("/r").status(404).hit().body("missing v1").calls(1),
        ],
    );

    permanent_redirect_with_max_age_is_cached => Case::new(
        |s| versioned(s, "max-age=60").status(301).h("location", "/elsewhere"),
        vec![
            get("/r").status(301).miss().header("location", "/elsewhere").cs("stored").calls(1),
            get("/r").status(301).hit().header("location", "/elsewhere").calls(1),
        ],
    );

    range_requests_are_cut_from_the_full_response => Case::new(
        |s| match s.header("range") {
            Some(_) => Answer::new(206)
                .h("cache-control", "max-age=60")
                .h("content-range", "bytes 0-3/10")
                .body("0123"),
            None => versioned(s, "max-age=60").body("0123456789"),
        },
        vec![
            get("/r").h("range", "bytes=0-3").status(206).miss().body("0123")
                .header("content-range", "bytes 0-3/10").cs("stored")
                .upstream_lacks("range").calls(1),
            get("/r").h("range", "bytes=4-").status(206).hit().body("456789")
                .header("content-range", "bytes 4-9/10").calls(1),
            get("/r").hit().body("0123456789").header("accept-ranges", "bytes").calls(1),
            get("/r").h("range", "bytes=20-").status(416).hit()
                .header("content-range", "bytes */10").calls(1),
        ],
    );

    partial_content_is_not_stored => Case::new(
        |_| Answer::new(206)
            .h("cache-control", "max-age=60")
            .h("content-range", "bytes 0-3/10")
            .body("0123"),
        vec![
            get("/r").status(206).miss().body("0123").calls(1),
            get("/r").status(206).miss().body("0123").calls(2),
        ],
    );

    server_error_without_freshness_is_not_cached => Case::new(
        |s| Answer::new(500).body(format!("err v{}", s.n)),
        vec![
            get("/r").status(500).miss().body("err v1").calls(1),
            get("/r").status(500).miss().body("err v2").calls(2),
        ],
    );
}

// ---------------------------------------------------------------------------
// Headers on the way out (RFC 9111 §3.1, §5.1; RFC 9110 §7.6.1; RFC 9211)
// ---------------------------------------------------------------------------

cases! {
    hop_by_hop_headers_are_neither_forwarded_nor_stored => Case::new(
        |s| versioned(s, "max-age=60")
            .h("connection", "x-foo")
            .h("x-foo", "secret")
            .h("keep-alive", "timeout=5")
            .h("x-end", "kept"),
        vec![
            get("/r").miss().body("v1").cs("stored")
                .lacks("x-foo").lacks("keep-alive").header("x-end", "kept").calls(1),
            get("/r").hit().body("v1").has("age")
                .lacks("x-foo").lacks("keep-alive").lacks("connection")
                .header("x-end", "kept").calls(1),
        ],
    );

    head_after_a_cached_get_is_a_hit_without_a_body => Case::new(
        |s| versioned(s, "max-age=60"),
        vec![
            get("/r").miss().body("v1").cs("stored").calls(1),
            head("/r").hit().no_body().header("content-length", "2").has("age").calls(1),
        ],
    );
}

// ---------------------------------------------------------------------------
// Invalidation by unsafe methods (RFC 9111 §4.4)
// ---------------------------------------------------------------------------

/// `GET` anything: `<path> v<n>`, fresh for a minute. `POST` answers `201`
/// with `Location: /users/42`; with `x-answer: 400` it fails with `400`,
/// with `x-answer: absolute` the `Location` is an absolute URL on the
/// request's host, with `x-answer: foreign` one on another host. `PUT`
/// answers `200` with `Content-Location: /users/42/profile`, `DELETE` `204`.
fn users(s: &Seen) -> Answer {
    match (&s.method, s.header("x-answer")) {
        (&Method::POST, Some("400")) => Answer::new(400).body("bad"),
        (&Method::POST, Some("absolute")) => {
            let host = s.header("host").unwrap_or("missing-host");
            Answer::new(201)
                .h("location", format!("http://{host}/users/42"))
                .body("created")
        }
        (&Method::POST, Some("foreign")) => Answer::new(201)
            .h("location", "http://elsewhere.example/users/42")
            .body("created"),
        (&Method::POST, _) => Answer::new(201).h("location", "/users/42").body("created"),
        (&Method::PUT, _) => Answer::ok("updated").h("content-location", "/users/42/profile"),
        (&Method::DELETE, _) => Answer::new(204),
        _ => versioned(s, "max-age=60").body(format!("{} v{}", s.path, s.n)),
    }
}

cases! {
    created_post_invalidates_its_location_and_its_target => Case::new(
        users,
        vec![
            get("/users/42").miss().body("/users/42 v1").calls(1),
            get("/users/7").miss().body("/users/7 v1").calls(2),
            get("/actions/create").miss().body("/actions/create v1").calls(3),
            get("/users/42").hit().calls(3),
            get("/actions/create").hit().calls(3),
            post("/actions/create").status(201).cs("fwd=bypass").calls(4),
            get("/users/42").miss().body("/users/42 v2").calls(5),
            get("/actions/create").miss().body("/actions/create v2").calls(6),
            get("/users/7").hit().body("/users/7 v1").calls(6),
        ],
    );

    failed_post_invalidates_nothing => Case::new(
        users,
        vec![
            get("/users/42").miss().calls(1),
            get("/actions/create").miss().calls(2),
            post("/actions/create").h("x-answer", "400").status(400).calls(3),
            get("/users/42").hit().body("/users/42 v1").calls(3),
            get("/actions/create").hit().body("/actions/create v1").calls(3),
        ],
    );

    absolute_same_origin_location_invalidates => Case::new(
        users,
        vec![
            get("/users/42").miss().calls(1),
            post("/actions/create").h("x-answer", "absolute").status(201).calls(2),
            get("/users/42").miss().body("/users/42 v2").calls(3),
        ],
    );

    foreign_location_does_not_invalidate => Case::new(
        users,
        vec![
            get("/users/42").miss().calls(1),
            post("/actions/create").h("x-answer", "foreign").status(201).calls(2),
            get("/users/42").hit().body("/users/42 v1").calls(2),
        ],
    );

    put_invalidates_its_path_and_content_location => Case::new(
        users,
        vec![
            get("/users/42/profile").miss().calls(1),
            get("/accounts/1").miss().calls(2),
            get("/users/7").miss().calls(3),
            step(Method::PUT, "/accounts/1").body("updated").calls(4),
            get("/users/42/profile").miss().body("/users/42/profile v2").calls(5),
            get("/accounts/1").miss().body("/accounts/1 v2").calls(6),
            get("/users/7").hit().body("/users/7 v1").calls(6),
        ],
    );

    delete_invalidates_its_path => Case::new(
        users,
        vec![
            get("/users/42").miss().calls(1),
            get("/users/420").miss().calls(2),
            delete("/users/42").status(204).calls(3),
            get("/users/42").miss().body("/users/42 v2").calls(4),
            get("/users/420").hit().body("/users/420 v1").calls(4),
        ],
    );
}
