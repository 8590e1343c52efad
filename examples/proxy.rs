//! Run with: cargo run --release --example proxy -- --upstream http://127.0.0.1:3000
//!
//! A caching reverse proxy: tower-fence in front of a hyper client that
//! forwards every request to one upstream. `GET` responses the upstream lets a
//! shared cache keep (`Cache-Control: max-age`, `s-maxage`, `Expires`) are
//! served from the cache until they go stale; everything else goes through.
//! Each response says what the cache did in its `Cache-Status` header:
//!
//! ```text
//! curl -i http://127.0.0.1:8080/some/page   # cache-status: tower-fence; fwd=uri-miss; fwd-status=200; stored
//! curl -i http://127.0.0.1:8080/some/page   # cache-status: tower-fence; hit; ttl=59
//! ```
//!
//! Options (`--help` lists them with their defaults):
//!
//! - `--upstream http://HOST:PORT` (required): where requests go (plain HTTP).
//! - `--listen ADDR` (default `127.0.0.1:8080`): where the proxy listens;
//!   port 0 picks a free one. The proxy prints `listening on ADDR` once it
//!   accepts connections.
//! - `--redis redis://...`: cache in that Redis instead of process memory;
//!   `--redis-cluster redis://A,redis://B,...`: in that Redis Cluster.
//! - `--local-tier BYTES` (default off; with `--redis` or `--redis-cluster`
//!   only): keep up to that many bytes of the entries read from Redis in
//!   this process too, and serve hits on them without a round trip (see
//!   [`FenceLayerBuilder::local_tier`](tower_fence::FenceLayerBuilder::local_tier)).
//!   A write, a fill or a purge through any proxy on the same Redis drops
//!   the copies it touches in every proxy, through the fill feed;
//!   `--local-tier-ttl SECS` (default 2) bounds how long a copy is kept if
//!   such a message never arrives, and so how much older than a completed
//!   write another proxy's answer can be.
//! - `--default-ttl SECS` (default 0): how long a response that states no
//!   freshness of its own is kept; 0 keeps only what the upstream's headers
//!   make cacheable.
//! - `--grace SECS` (default 0): how long an expired entry is still served
//!   while one background request refreshes it (stale-while-revalidate).
//! - `--stale-if-error SECS` (default 0): how long after expiry an entry is
//!   served when the upstream answers 5xx. Independently of it, when the
//!   upstream cannot be reached at all (refused, reset, timed out) the
//!   proxy serves what it still holds (RFC 9111 §4.2.4), unless the entry
//!   says `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache`.
//! - `--keep SECS` (default 3600): how long an expired entry is held, for
//!   revalidation (`If-None-Match`) and for those unreachable times.
//! - `--upstream-timeout SECS` (default 60): how long the upstream may take
//!   to send a response's head; past it the request gets `504` (or the
//!   stale entry).
//! - `--max-body-size BYTES` (default 1048576): larger bodies stream
//!   through, not stored.
//! - `--heuristic FRACTION` (default off) and `--heuristic-cap SECS`
//!   (default 86400): RFC 9111 §4.2.2 heuristic freshness, that fraction of
//!   the time since `Last-Modified`, capped, for responses that state no
//!   freshness.
//! - `--namespace NS` (default `tf:`): the prefix of every key, so proxies
//!   for different sites can share a Redis.
//! - `--purge-secret SECRET` (or the environment variable
//!   `TOWER_FENCE_PURGE_SECRET`; at least 16 visible ASCII characters):
//!   answer `PURGE` requests carrying `Authorization: Bearer SECRET` (see
//!   [`tower_fence::purge`]; a path, `Purge-Scope: prefix`, `Purge-Tag:`,
//!   `Purge-Mode: soft`). Without it a `PURGE` is forwarded like any other
//!   request and the proxy purges nothing on its own.
//! - `--soft-purge`: writes (`POST`, `PUT`, …) mark what they touch stale
//!   instead of deleting it (served within grace while it refreshes).
//! - `--trust-forwarded`: keep the client's forwarding headers (see below),
//!   for a proxy that only another, trusted proxy talks to; the cache then
//!   keys on them.
//!
//! Interim responses (`103 Early Hints`, other 1xx) from the upstream are
//! not forwarded: hyper's server, which this proxy is built on, cannot send
//! an interim response before the final one (support is an open hyper pull
//! request, hyperium/hyper#4114). RFC 8297 lets an intermediary drop them;
//! they are never stored, and the final response is forwarded as usual.
//!
//! The request keeps the client's `Host` header, so entries are keyed by the
//! public host name; hop-by-hop headers are dropped both ways, bodies are
//! streamed, and an upstream that cannot be reached gives `502 Bad Gateway`
//! (`504 Gateway Timeout` when it is too slow), or the stale entry.
//! A request whose host is ambiguous gets `400 Bad Request` and reaches
//! neither the cache nor the upstream (RFC 9112 §3.2): two `Host` lines, a
//! `Host` that is not `host[:port]`, an HTTP/1.1 request without `Host`, or
//! an absolute-form target (`GET http://a.example/ HTTP/1.1`) that names
//! another host than `Host`.
//!
//! The forwarding headers (`X-Forwarded-For`, `X-Forwarded-Host`,
//! `X-Forwarded-Proto`, `X-Forwarded-Port`, `Forwarded`) are the proxy's
//! own: whatever the client sent under those names is dropped, and the
//! upstream gets the client's address (`X-Forwarded-For`, `Forwarded:
//! for=`), `http`, the request's host (`X-Forwarded-Host`, `Forwarded:
//! host=`) and its port. With `--trust-forwarded` the client's values are
//! kept (this hop is appended to `X-Forwarded-For` and `Forwarded`; what is
//! missing is filled in) and all five become part of the cache key, so
//! requests that differ in them are cached apart. That splits the cache
//! per client address (`X-Forwarded-For`, `for=`): trust them only where
//! the origin needs them.
//!
//! The same holds for any app behind tower-fence: every request header its
//! response depends on must be in the key
//! ([`FenceLayerBuilder::key_header`](tower_fence::FenceLayerBuilder::key_header))
//! or in the response's `Vary`, else one request can poison the entry for
//! everyone. `X-Forwarded-Host` is the usual culprit (absolute links,
//! redirects): have the proxy in front set it, as this one does, or key on
//! it.
//!
//! Logs go to stderr; set `RUST_LOG` (e.g. `RUST_LOG=debug`) for more.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::net::{Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower_fence::invalidate::Purge;
use tower_fence::purge::PurgeService;
use tower_fence::{Clock, FenceLayer, FenceService, OriginUnreachable};
use tower_layer::Layer as _;
use tower_service::Service;

/// Where the proxy listens unless `--listen` says otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// How long connecting to the upstream may take before the request gets a 502.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a Redis connection may take to open.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long open connections get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long an expired entry is held unless `--keep` says otherwise.
const DEFAULT_PROXY_KEEP: Duration = Duration::from_secs(3600);
/// How long the upstream may take to answer unless `--upstream-timeout`
/// says otherwise.
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a local-tier copy is kept unless `--local-tier-ttl` says
/// otherwise.
const DEFAULT_LOCAL_TIER_TTL: Duration = Duration::from_secs(2);
/// The heuristic freshness cap unless `--heuristic-cap` says otherwise.
const DEFAULT_HEURISTIC_CAP: Duration = Duration::from_secs(86_400);
/// Where the purge secret is read from when `--purge-secret` is not given.
pub(crate) const PURGE_SECRET_ENV: &str = "TOWER_FENCE_PURGE_SECRET";

/// The usage message printed for bad arguments and `--help`.
pub(crate) const USAGE: &str = "\
usage: proxy --upstream http://HOST:PORT [options]

  --upstream URL           where requests are forwarded (http only, no path); required
  --listen ADDR            address to listen on; port 0 picks one (default 127.0.0.1:8080)
  --redis URL              cache in this Redis (default: process memory)
  --redis-cluster URLS     cache in this Redis Cluster, nodes comma-separated
                           (default: process memory)
  --local-tier BYTES       with --redis or --redis-cluster: keep this many bytes of
                           entries in this process too, hits without a round trip
                           (default off)
  --local-tier-ttl SECS    longest a local copy is kept: how much older than a write
                           another proxy may answer if the change never reaches it
                           (default 2)
  --default-ttl SECS       how long a response without Cache-Control/Expires freshness
                           is kept (default 0: only what the upstream makes cacheable)
  --grace SECS             serve an expired entry this long while one request refreshes
                           it (default 0)
  --stale-if-error SECS    serve an expired entry this long when the upstream answers
                           5xx (default 0); when it cannot be reached at all, what is
                           still held is served anyway, unless the entry forbids it
  --keep SECS              hold expired entries this long, for revalidation and for
                           an unreachable upstream (default 3600)
  --upstream-timeout SECS  longest wait for the upstream's response head (default 60)
  --max-body-size BYTES    largest body stored (default 1048576)
  --heuristic FRACTION     heuristic freshness: this fraction of the time since
                           Last-Modified, for responses that state none (default off)
  --heuristic-cap SECS     longest heuristic freshness (default 86400)
  --namespace NS           prefix of every cache key (default tf:)
  --purge-secret SECRET    answer PURGE requests with Authorization: Bearer SECRET
                           (default: off; also read from TOWER_FENCE_PURGE_SECRET)
  --soft-purge             writes mark what they touch stale instead of deleting it
                           (default off)
  --trust-forwarded        keep the client's X-Forwarded-* and Forwarded headers (behind
                           a trusted proxy) and key the cache on them (default off: the
                           proxy replaces them with its own)
  -h, --help               print this and exit";

/// The proxy's settings, from the command line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Args {
    /// Scheme of the upstream (always `http`).
    pub(crate) upstream_scheme: Scheme,
    /// `host:port` of the upstream.
    pub(crate) upstream_authority: Authority,
    /// Where to listen.
    pub(crate) listen: SocketAddr,
    /// The Redis URL to cache in.
    pub(crate) redis: Option<String>,
    /// The Redis Cluster nodes to cache in. Process memory when neither.
    pub(crate) redis_cluster: Option<Vec<String>>,
    /// A local tier in front of Redis: its capacity in bytes and the
    /// longest a copy is kept.
    pub(crate) local_tier: Option<(u64, Duration)>,
    /// TTL of responses that state no freshness; zero stores only those
    /// that do.
    pub(crate) default_ttl: Duration,
    /// Stale-while-revalidate window.
    pub(crate) grace: Duration,
    /// Stale-if-error window (5xx from the upstream).
    pub(crate) stale_if_error: Duration,
    /// How long expired entries are held.
    pub(crate) keep: Duration,
    /// Longest wait for the upstream's response head.
    pub(crate) upstream_timeout: Duration,
    /// Largest body stored.
    pub(crate) max_body_size: usize,
    /// Heuristic freshness: fraction and cap.
    pub(crate) heuristic: Option<(f64, Duration)>,
    /// Prefix of every key.
    pub(crate) namespace: String,
    /// The purge endpoint's shared secret; no endpoint when `None`.
    pub(crate) purge_secret: Option<String>,
    /// Whether writes soft-purge.
    pub(crate) soft_purge: bool,
    /// Whether the client's `X-Forwarded-*` and `Forwarded` headers are kept
    /// (and keyed) instead of replaced.
    pub(crate) trust_forwarded: bool,
    /// Where the cache reads the time of day: the system's clock; not an
    /// option, a test in this process may set a manual one.
    pub(crate) clock: Clock,
}

/// Options that take a value.
pub(crate) const VALUE_OPTIONS: [&str; 16] = [
    "--upstream",
    "--listen",
    "--redis",
    "--redis-cluster",
    "--local-tier",
    "--local-tier-ttl",
    "--default-ttl",
    "--grace",
    "--stale-if-error",
    "--keep",
    "--upstream-timeout",
    "--max-body-size",
    "--heuristic",
    "--heuristic-cap",
    "--namespace",
    "--purge-secret",
];

/// Options that take none.
pub(crate) const SWITCHES: [&str; 2] = ["--trust-forwarded", "--soft-purge"];

/// Parses the command line, without the program name (`std::env::args()
/// .skip(1)`). Accepts `--flag value` and `--flag=value`. `Err` holds a
/// one-line reason; the caller prints it with [`USAGE`].
pub(crate) fn parse_args<I, S>(args: I) -> Result<Args, String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut values: HashMap<&'static str, String> = HashMap::new();
    let mut switches: HashSet<&'static str> = HashSet::new();

    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        if let Some(&switch) = SWITCHES.iter().find(|s| **s == flag) {
            if inline.is_some() {
                return Err(format!("{flag} takes no value"));
            }
            if !switches.insert(switch) {
                return Err(format!("{flag} given twice"));
            }
            continue;
        }
        let Some(&option) = VALUE_OPTIONS.iter().find(|o| **o == flag) else {
            if flag.starts_with('-') {
                return Err(format!("unknown option {flag:?}"));
            }
            return Err(format!("unexpected argument {arg:?}"));
        };
        if values.contains_key(option) {
            return Err(format!("{flag} given twice"));
        }
        let value = match inline {
            Some(value) => value,
            None => match args.next() {
                Some(value) if !value.starts_with("--") => value,
                _ => return Err(format!("{flag} needs a value")),
            },
        };
        if value.is_empty() {
            return Err(format!("{flag} needs a value"));
        }
        values.insert(option, value);
    }

    let upstream = values
        .remove("--upstream")
        .ok_or("--upstream is required")?;
    let (upstream_scheme, upstream_authority) = parse_upstream(&upstream)?;
    let listen = values.remove("--listen");
    let listen = listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = listen
        .parse::<SocketAddr>()
        .map_err(|_| format!("--listen {listen:?} is not an address like 127.0.0.1:8080"))?;
    let redis = values.remove("--redis");
    if let Some(url) = &redis {
        check_redis_url(url)?;
    }
    let redis_cluster = match values.remove("--redis-cluster") {
        None => None,
        Some(nodes) => {
            let nodes: Vec<String> = nodes.split(',').map(|n| n.trim().to_owned()).collect();
            for node in &nodes {
                check_cluster_url(node)?;
            }
            Some(nodes)
        }
    };
    if redis.is_some() && redis_cluster.is_some() {
        return Err("--redis and --redis-cluster exclude each other".into());
    }
    let local_tier_ttl = values.contains_key("--local-tier-ttl");
    let mut secs = |flag: &'static str, default: Duration| -> Result<Duration, String> {
        match values.remove(flag) {
            None => Ok(default),
            Some(secs) => secs
                .parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| format!("{flag} {secs:?} is not a whole number of seconds")),
        }
    };
    let default_ttl = secs("--default-ttl", Duration::ZERO)?;
    let grace = secs("--grace", Duration::ZERO)?;
    let stale_if_error = secs("--stale-if-error", Duration::ZERO)?;
    let keep = secs("--keep", DEFAULT_PROXY_KEEP)?;
    let upstream_timeout = secs("--upstream-timeout", DEFAULT_UPSTREAM_TIMEOUT)?;
    let heuristic_cap = secs("--heuristic-cap", DEFAULT_HEURISTIC_CAP)?;
    let local_ttl = secs("--local-tier-ttl", DEFAULT_LOCAL_TIER_TTL)?;
    if upstream_timeout.is_zero() {
        return Err("--upstream-timeout must be at least 1 second".into());
    }
    let max_body_size = match values.remove("--max-body-size") {
        None => tower_fence::DEFAULT_MAX_BODY_SIZE,
        Some(bytes) => bytes
            .parse::<usize>()
            .map_err(|_| format!("--max-body-size {bytes:?} is not a number of bytes"))?,
    };
    let heuristic = match values.remove("--heuristic") {
        None => None,
        Some(fraction) => match fraction.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 && f <= 1.0 => Some((f, heuristic_cap)),
            _ => {
                return Err(format!(
                    "--heuristic {fraction:?} is not a fraction above 0 and at most 1"
                ))
            }
        },
    };
    let local_tier = match values.remove("--local-tier") {
        None if local_tier_ttl => return Err("--local-tier-ttl needs --local-tier".into()),
        None => None,
        Some(bytes) => match bytes.parse::<u64>() {
            Ok(bytes) if bytes > 0 => Some((bytes, local_ttl)),
            _ => {
                return Err(format!(
                    "--local-tier {bytes:?} is not a number of bytes above 0"
                ))
            }
        },
    };
    if local_tier.is_some() {
        if redis.is_none() && redis_cluster.is_none() {
            return Err(
                "--local-tier needs --redis or --redis-cluster (memory is local already)".into(),
            );
        }
        if local_ttl.is_zero() {
            return Err("--local-tier-ttl must be at least 1 second".into());
        }
    }
    let namespace = values
        .remove("--namespace")
        .unwrap_or_else(|| tower_fence::DEFAULT_NAMESPACE.to_owned());
    let purge_secret = values.remove("--purge-secret");
    Ok(Args {
        upstream_scheme,
        upstream_authority,
        listen,
        redis,
        redis_cluster,
        local_tier,
        default_ttl,
        grace,
        stale_if_error,
        keep,
        upstream_timeout,
        max_body_size,
        heuristic,
        namespace,
        purge_secret,
        soft_purge: switches.contains("--soft-purge"),
        trust_forwarded: switches.contains("--trust-forwarded"),
        clock: Clock::system(),
    })
}

/// Splits `http://host:port[/]` into its scheme and authority.
fn parse_upstream(upstream: &str) -> Result<(Scheme, Authority), String> {
    let uri = upstream
        .parse::<Uri>()
        .map_err(|_| format!("--upstream {upstream:?} is not a URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Err(format!(
            "--upstream {upstream:?} needs a scheme and a host, as in http://127.0.0.1:3000"
        ));
    };
    if *scheme != Scheme::HTTP {
        return Err(format!(
            "--upstream {upstream:?}: only http:// upstreams are supported"
        ));
    }
    if authority.host().is_empty() {
        return Err(format!("--upstream {upstream:?} has no host"));
    }
    if authority.as_str().contains('@') {
        return Err(format!(
            "--upstream {upstream:?}: user info is not supported"
        ));
    }
    if uri.path() != "/" || uri.query().is_some() {
        return Err(format!(
            "--upstream {upstream:?}: give only scheme, host and port (no path or query)"
        ));
    }
    Ok((scheme.clone(), authority.clone()))
}

#[cfg(feature = "redis")]
fn check_redis_url(url: &str) -> Result<(), String> {
    use bb8_redis::redis::IntoConnectionInfo as _;
    url.into_connection_info()
        .map(drop)
        .map_err(|e| format!("--redis {url:?} is not a Redis URL: {e}"))
}

#[cfg(not(feature = "redis"))]
fn check_redis_url(_url: &str) -> Result<(), String> {
    Err("--redis needs tower-fence's `redis` feature".to_owned())
}

#[cfg(feature = "cluster")]
fn check_cluster_url(url: &str) -> Result<(), String> {
    use bb8_redis::redis::IntoConnectionInfo as _;
    url.into_connection_info()
        .map(drop)
        .map_err(|e| format!("--redis-cluster node {url:?} is not a Redis URL: {e}"))
}

#[cfg(not(feature = "cluster"))]
fn check_cluster_url(_url: &str) -> Result<(), String> {
    Err("--redis-cluster needs tower-fence's `cluster` feature".to_owned())
}

/// An error that stops the proxy (binding the port, reaching Redis).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body the proxy answers with: the upstream's, or a short text of its own.
pub(crate) type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Forwards requests to the upstream. The inner service of the cache.
#[derive(Clone)]
pub(crate) struct Forward {
    client: Client<HttpConnector, Incoming>,
    scheme: Scheme,
    authority: Authority,
    /// Longest wait for the upstream's response head.
    timeout: Duration,
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field(
                "upstream",
                &format_args!("{}://{}", self.scheme, self.authority),
            )
            .finish_non_exhaustive()
    }
}

impl Forward {
    /// A forwarder to `scheme://authority` over a pooled HTTP/1 client,
    /// waiting at most `timeout` for each response head.
    pub(crate) fn new(scheme: Scheme, authority: Authority, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(UPSTREAM_CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Forward {
            client,
            scheme,
            authority,
            timeout,
        }
    }

    /// Turns the client's request into the upstream's.
    fn rewrite(&self, req: Request<Incoming>) -> Result<Request<Incoming>, http::Error> {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // Host names the public site: the authority of an absolute-form
        // (or HTTP/2) request target, else the client's Host, else the
        // upstream. The cache keys entries the same way.
        let host = match parts.uri.authority() {
            Some(authority) => Some(host_of(authority)),
            None if parts.headers.contains_key(header::HOST) => None,
            None => Some(host_of(&self.authority)),
        };
        if let Some(host) = host {
            let host = HeaderValue::from_str(&host).map_err(http::Error::from)?;
            parts.headers.insert(header::HOST, host);
        }
        parts.uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()?;
        strip_hop_by_hop(&mut parts.headers);
        strip_named_header(&mut parts.headers, "proxy-connection");
        // The request goes out as HTTP/1.1 whatever the client spoke.
        parts.version = http::Version::HTTP_11;
        Ok(Request::from_parts(parts, body))
    }
}

impl Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let upstream_req = self.rewrite(req);
        let client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let upstream_req = match upstream_req {
                Ok(req) => req,
                Err(err) => {
                    tracing::warn!(%method, %path, error = %err, "cannot build the upstream request");
                    return Ok(
                        text_response(StatusCode::BAD_REQUEST, "bad request\n").map(Either::Right)
                    );
                }
            };
            // The upstream could not be reached (refused, reset, too slow):
            // the answer is the proxy's own, marked so that the cache may
            // serve what it still holds instead (RFC 9111 §4.2.4).
            let unreachable = |status, text| {
                let mut response = text_response(status, text).map(Either::Right);
                response.extensions_mut().insert(OriginUnreachable);
                Ok(response)
            };
            match tokio::time::timeout(timeout, client.request(upstream_req)).await {
                Ok(Ok(response)) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Ok(Response::from_parts(parts, Either::Left(body)))
                }
                Ok(Err(err)) => {
                    tracing::warn!(%method, %path, error = %error_chain(&err), "upstream request failed");
                    unreachable(
                        StatusCode::BAD_GATEWAY,
                        "502 Bad Gateway: the upstream could not be reached\n",
                    )
                }
                Err(_) => {
                    tracing::warn!(%method, %path, ?timeout, "upstream timed out");
                    unreachable(
                        StatusCode::GATEWAY_TIMEOUT,
                        "504 Gateway Timeout: the upstream did not answer in time\n",
                    )
                }
            }
        })
    }
}

/// Why a request's host is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadHost {
    /// More than one `Host` header line.
    Repeated,
    /// A `Host` or target authority that is not `host[:port]`.
    Invalid,
    /// An HTTP/1.1 request without `Host`.
    Missing,
    /// A target authority with user info (`user@host`).
    UserInfo,
    /// An absolute-form target whose authority is not the `Host`.
    Mismatch,
}

impl BadHost {
    /// The body of the `400` answer.
    fn message(self) -> &'static str {
        match self {
            BadHost::Repeated => "400 Bad Request: more than one Host header\n",
            BadHost::Invalid => "400 Bad Request: the host is not host[:port]\n",
            BadHost::Missing => "400 Bad Request: no Host header\n",
            BadHost::UserInfo => "400 Bad Request: user info in the request target\n",
            BadHost::Mismatch => {
                "400 Bad Request: the request target names another host than Host\n"
            }
        }
    }
}

/// The host a request is for, checked as RFC 9112 §3.2 asks: the authority
/// of an absolute-form (or HTTP/2) target, which must then agree with
/// `Host` if there is one; else the one `Host` header; `None` for an
/// HTTP/1.0 (or HTTP/2) request that names neither. Two `Host` lines, a
/// host that is not `host[:port]`, or an HTTP/1.1 request without `Host`
/// are refused.
///
/// The cache keys entries by this host, so a request that could name two
/// hosts must never reach it: one host would pick the entry, the other the
/// response stored in it.
pub(crate) fn request_host<B>(req: &Request<B>) -> Result<Option<HeaderValue>, BadHost> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(BadHost::Repeated);
    }
    let host = match host {
        Some(value) => Some(split_host_port(value.as_bytes()).ok_or(BadHost::Invalid)?),
        None if req.version() == Version::HTTP_11 => return Err(BadHost::Missing),
        None => None,
    };
    match (req.uri().authority(), host) {
        (Some(authority), host) => {
            if authority.as_str().contains('@') {
                return Err(BadHost::UserInfo);
            }
            let target = split_host_port(authority.as_str().as_bytes()).ok_or(BadHost::Invalid)?;
            if let Some(host) = host {
                let default_port = match req.uri().scheme_str() {
                    Some(scheme) if scheme.eq_ignore_ascii_case("http") => Some(80),
                    Some(scheme) if scheme.eq_ignore_ascii_case("https") => Some(443),
                    _ => None,
                };
                let port = |port: Option<u16>| port.or(default_port);
                if !target.0.eq_ignore_ascii_case(host.0) || port(target.1) != port(host.1) {
                    return Err(BadHost::Mismatch);
                }
            }
            HeaderValue::from_str(authority.as_str())
                .map(Some)
                .map_err(|_| BadHost::Invalid)
        }
        (None, Some(_)) => Ok(req.headers().get(header::HOST).cloned()),
        (None, None) => Ok(None),
    }
}

/// Splits `host[:port]` (RFC 9110 §7.2) into the host and the port, or
/// `None` when `value` is not that. The host is an IPv6 literal in
/// brackets, or a name of letters, digits, `-`, `.`, `_` and `~` (IPv4
/// addresses included): stricter than RFC 3986's reg-name, which also
/// allows sub-delimiters such as `,` and `;` and percent-encoding that no
/// DNS name holds and that origins split in ways of their own. The port is
/// 1 to 5 digits, at most 65535.
fn split_host_port(value: &[u8]) -> Option<(&[u8], Option<u16>)> {
    let (host, rest) = if value.first() == Some(&b'[') {
        let end = value.iter().position(|&b| b == b']')?;
        let (literal, rest) = value.split_at(end + 1);
        let inside = std::str::from_utf8(literal.get(1..end)?).ok()?;
        inside.parse::<Ipv6Addr>().ok()?;
        (literal, rest)
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        let (name, rest) = value.split_at(end);
        let name_byte =
            |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if name.is_empty() || !name.iter().all(name_byte) {
            return None;
        }
        (name, rest)
    };
    let port = match rest {
        [] => None,
        [b':', digits @ ..]
            if (1..=5).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) =>
        {
            Some(std::str::from_utf8(digits).ok()?.parse::<u16>().ok()?)
        }
        _ => return None,
    };
    Some((host, port))
}

/// The outermost service of a connection, in front of the cache: refuses
/// with `400 Bad Request` a request whose host is ambiguous or malformed
/// (see [`request_host`]), so that it reaches neither the cache nor the
/// upstream, and sets the forwarding headers (see [`set_forwarding`])
/// before the cache derives the key.
#[derive(Clone, Debug)]
pub(crate) struct Guard<S> {
    inner: S,
    /// The client's address.
    peer: SocketAddr,
    /// Whether the client's forwarding headers are kept (`--trust-forwarded`).
    trust_forwarded: bool,
    /// Answers `PURGE` requests, when a purge secret is set.
    purge: Option<PurgeService>,
}

impl<S> Guard<S> {
    /// Guards `inner` for requests from `peer`.
    pub(crate) fn new(inner: S, peer: SocketAddr, trust_forwarded: bool) -> Self {
        Guard {
            inner,
            peer,
            trust_forwarded,
            purge: None,
        }
    }

    /// Sends `PURGE` requests to `purge` instead of the cache and the
    /// upstream.
    pub(crate) fn purging(mut self, purge: Option<PurgeService>) -> Self {
        self.purge = purge;
        self
    }
}

impl<S, B> Service<Request<Incoming>> for Guard<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Either<B, Full<Bytes>>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let host = match request_host(&req) {
            Ok(host) => host,
            Err(bad) => {
                tracing::debug!(peer = %self.peer, method = %req.method(), uri = %req.uri(), reason = ?bad, "refused: bad host");
                let mut response = text_response(StatusCode::BAD_REQUEST, bad.message());
                // Whatever else the client meant to say on this connection
                // is suspect too.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return Box::pin(std::future::ready(Ok(response.map(Either::Right))));
            }
        };
        // Hop-by-hop first, so that `Connection` cannot name the proxy's
        // own forwarding headers away after they are set.
        strip_hop_by_hop(req.headers_mut());
        strip_named_header(req.headers_mut(), "proxy-connection");
        set_forwarding(
            req.headers_mut(),
            self.peer,
            host.as_ref(),
            self.trust_forwarded,
        );
        if let (Some(purge), "PURGE") = (&mut self.purge, req.method().as_str()) {
            let answer = purge.call(req);
            return Box::pin(async move { answer.await.map(|r| r.map(Either::Right)) });
        }
        let response = self.inner.call(req);
        Box::pin(async move { response.await.map(|response| response.map(Either::Left)) })
    }
}

/// `X-Forwarded-For`: the client addresses a request passed through.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Host`: the host the client asked for.
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Forwarded-Proto`: the scheme the client spoke.
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Port`: the port the client connected to.
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// The headers by which a proxy tells the origin about the client: the
/// de-facto `X-Forwarded-*` and RFC 7239's `Forwarded`. An origin that
/// builds absolute links or redirects from them makes its responses depend
/// on them, so they are either the proxy's own or part of the cache key.
pub(crate) const FORWARDING_HEADERS: [HeaderName; 5] = [
    X_FORWARDED_FOR,
    X_FORWARDED_HOST,
    X_FORWARDED_PROTO,
    X_FORWARDED_PORT,
    header::FORWARDED,
];

/// Sets the forwarding headers of a request from `peer` for `host` (the
/// checked [`request_host`]).
///
/// By default the client's own are removed first, so the origin only sees
/// what the proxy knows: `X-Forwarded-For` and `Forwarded: for=` the
/// peer's address, `X-Forwarded-Proto` and `proto=` `http`,
/// `X-Forwarded-Host` and `host=` the request's host, `X-Forwarded-Port`
/// its port (80 when it names none). With `trust` (a proxy behind another,
/// trusted one) the client's are kept: this hop is appended to the lists
/// (`X-Forwarded-For`, `Forwarded`) and the others are set only when the
/// client sent none; the cache then keys on all five (see
/// [`fence_layer`]).
pub(crate) fn set_forwarding(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    host: Option<&HeaderValue>,
    trust: bool,
) {
    if !trust {
        for name in &FORWARDING_HEADERS {
            headers.remove(name);
        }
    }
    let ip = peer.ip().to_canonical();
    // RFC 7239 §6: an IPv6 node is bracketed and quoted.
    let mut element = match ip {
        std::net::IpAddr::V4(v4) => format!("for={v4}"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    };
    if let Some(host) = host {
        element.push_str(";host=");
        push_token_or_quoted(&mut element, host.as_bytes());
    }
    element.push_str(";proto=http");
    append_to_list(headers, X_FORWARDED_FOR, ip.to_string().as_bytes());
    append_to_list(headers, header::FORWARDED, element.as_bytes());

    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if let Some(host) = host {
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        if !headers.contains_key(&X_FORWARDED_PORT) {
            if let Some((_, port)) = split_host_port(host.as_bytes()) {
                headers.insert(X_FORWARDED_PORT, HeaderValue::from(port.unwrap_or(80)));
            }
        }
    }
}

/// Appends `item` to the comma-separated list `name`, joining the lines the
/// list already has into one.
fn append_to_list(headers: &mut HeaderMap, name: HeaderName, item: &[u8]) {
    let mut joined = Vec::new();
    for value in headers.get_all(&name) {
        let value = value.as_bytes().trim_ascii();
        if !value.is_empty() {
            joined.extend_from_slice(value);
            joined.extend_from_slice(b", ");
        }
    }
    joined.extend_from_slice(item);
    // The parts are header values and ", ": the whole is one too. Should it
    // not be, this hop alone is better than nothing.
    let value = HeaderValue::from_bytes(&joined).or_else(|_| HeaderValue::from_bytes(item));
    match value {
        Ok(value) => {
            headers.insert(name, value);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// Pushes `value` as an RFC 9110 token if it is one, else as a quoted
/// string.
fn push_token_or_quoted(out: &mut String, value: &[u8]) {
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if !value.is_empty() && value.iter().all(tchar) {
        out.push_str(&String::from_utf8_lossy(value));
        return;
    }
    out.push('"');
    for ch in String::from_utf8_lossy(value).chars() {
        if ch == '"' || ch == '\\' {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('"');
}

/// `host[:port]` of an authority, without user info.
fn host_of(authority: &Authority) -> String {
    match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_owned(),
    }
}

/// A short plain-text response that no cache keeps.
fn text_response(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An error and its sources on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): `Connection`, those it
/// names, and the fixed ones.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    strip_named_header(headers, "keep-alive");
}

fn strip_named_header(headers: &mut HeaderMap, name: &'static str) {
    headers.remove(HeaderName::from_static(name));
}

/// The cache layer the arguments ask for. With `--trust-forwarded` the
/// client's forwarding headers reach the upstream, so they are part of the
/// key: an origin's response may depend on any of them (absolute links
/// built from `X-Forwarded-Host` are the usual case), and an unkeyed one
/// would let one request poison the entry for everyone.
async fn fence_layer(args: &Args) -> Result<FenceLayer, BoxError> {
    let mut builder = FenceLayer::builder()
        .default_ttl(args.default_ttl)
        .grace(args.grace)
        .stale_if_error(args.stale_if_error)
        .keep(args.keep)
        .max_body_size(args.max_body_size)
        .namespace(args.namespace.clone())
        .clock(args.clock.clone());
    if let Some((fraction, cap)) = args.heuristic {
        builder = builder.heuristic_freshness(fraction, cap);
    }
    if let Some((capacity_bytes, ttl)) = args.local_tier {
        builder = builder.local_tier(capacity_bytes, ttl);
    }
    if args.soft_purge {
        builder = builder.write_purge(Purge::Soft);
    }
    if args.trust_forwarded {
        for name in &FORWARDING_HEADERS {
            builder = builder.key_header(name.as_str());
        }
    }
    let builder = match (&args.redis, &args.redis_cluster) {
        (Some(url), _) => with_redis(builder, url).await?,
        (None, Some(nodes)) => with_cluster(builder, nodes)?,
        (None, None) => builder,
    };
    Ok(builder.build()?)
}

#[cfg(feature = "cluster")]
fn with_cluster(
    builder: tower_fence::FenceLayerBuilder,
    nodes: &[String],
) -> Result<tower_fence::FenceLayerBuilder, BoxError> {
    let store = tower_fence::store::RedisClusterStore::new(nodes.iter().map(String::as_str))?;
    Ok(builder.store(store))
}

#[cfg(not(feature = "cluster"))]
fn with_cluster(
    _builder: tower_fence::FenceLayerBuilder,
    _nodes: &[String],
) -> Result<tower_fence::FenceLayerBuilder, BoxError> {
    Err("--redis-cluster needs tower-fence's `cluster` feature".into())
}

#[cfg(feature = "redis")]
async fn with_redis(
    builder: tower_fence::FenceLayerBuilder,
    url: &str,
) -> Result<tower_fence::FenceLayerBuilder, BoxError> {
    let manager = bb8_redis::RedisConnectionManager::new(url)?;
    let pool = bb8::Pool::builder()
        .connection_timeout(REDIS_CONNECT_TIMEOUT)
        .build(manager)
        .await?;
    // Fail at start rather than run uncached because of a typo.
    if let Err(err) = pool.get().await {
        return Err(format!("cannot reach Redis at {url}: {err}").into());
    }
    Ok(builder.redis(pool))
}

#[cfg(not(feature = "redis"))]
async fn with_redis(
    _builder: tower_fence::FenceLayerBuilder,
    _url: &str,
) -> Result<tower_fence::FenceLayerBuilder, BoxError> {
    let _ = REDIS_CONNECT_TIMEOUT;
    Err("--redis needs tower-fence's `redis` feature".into())
}

/// Runs the proxy until Ctrl-C (or SIGTERM), then lets open connections
/// finish. `ready` is called with the bound address once the proxy accepts
/// connections.
pub(crate) async fn run(args: Args, ready: impl FnOnce(SocketAddr)) -> Result<(), BoxError> {
    run_until(args, ready, shutdown_signal()).await
}

/// [`run`], stopping when `shutdown` completes instead of on a signal.
pub(crate) async fn run_until(
    args: Args,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    let layer = fence_layer(&args).await?;
    let purge = match &args.purge_secret {
        None => None,
        Some(secret) => Some(
            PurgeService::new(layer.invalidator(), secret)
                .map_err(|e| format!("--purge-secret: {e}"))?,
        ),
    };
    let forward = Forward::new(
        args.upstream_scheme.clone(),
        args.upstream_authority.clone(),
        args.upstream_timeout,
    );
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        upstream = %format_args!("{}://{}", args.upstream_scheme, args.upstream_authority),
        store = match (&args.redis, &args.redis_cluster) {
            (Some(_), _) => "redis",
            (None, Some(_)) => "redis-cluster",
            (None, None) => "memory",
        },
        namespace = %args.namespace,
        default_ttl_secs = args.default_ttl.as_secs(),
        grace_secs = args.grace.as_secs(),
        stale_if_error_secs = args.stale_if_error.as_secs(),
        keep_secs = args.keep.as_secs(),
        purge_endpoint = args.purge_secret.is_some(),
        soft_purge = args.soft_purge,
        trust_forwarded = args.trust_forwarded,
        "proxy started"
    );
    ready(addr);

    let builder = auto::Builder::new(TokioExecutor::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service: Guard<FenceService<Forward>> =
            Guard::new(layer.layer(forward.clone()), peer, args.trust_forwarded)
                .purging(purge.clone());
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let conn =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }

    tracing::info!("shutting down: no new connections");
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "closing connections that did not finish"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// Completes on Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    let args = match parse_args(argv) {
        Ok(mut args) => {
            if args.purge_secret.is_none() {
                args.purge_secret = std::env::var(PURGE_SECRET_ENV)
                    .ok()
                    .filter(|s| !s.is_empty());
            }
            args
        }
        Err(reason) => {
            eprintln!("proxy: {reason}\n\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let ready = |addr: SocketAddr| {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on {addr}");
        let _ = stdout.flush();
    };
    match run(args, ready).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("proxy: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
