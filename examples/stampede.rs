//! Run with: cargo run --release --example stampede -- [--requests 500] [--origin-ms 50] [--redis redis://127.0.0.1:6379] [--processes 4]
//!
//! Measures a cache stampede. N requests (`--requests`, default 500) for one
//! cold key start at the same instant, in front of an origin that takes
//! `--origin-ms` (default 50 ms) per call. They go twice through a cache:
//!
//! 1. **naive cache-aside**: look the key up; on a miss call the origin and
//!    store its body (a `Mutex<HashMap>`, or Redis `GET`/`SET` through a bb8
//!    pool with `--redis`). Every request that arrives before the first fill
//!    misses, so the origin sees about N calls.
//! 2. **tower-fence**: a [`FenceLayer`] on the same kind of store (its
//!    `MemoryStore`, or `.redis(pool)` with `--redis`).
//!
//! It prints one row per cache: origin calls, client latency (p50, p99 and
//! max in ms, from just before each request is sent to the end of its body)
//! and failed requests. A stampede-proof cache calls the origin once per key,
//! whatever N.
//!
//! With `--processes P` (P > 1, needs `--redis`) the origin is a real HTTP
//! server on 127.0.0.1 in this process, and P copies of this program (started
//! with a hidden `--worker` flag) each send their share of the N requests
//! through their own cache in front of it, sharing one Redis, as P instances
//! of an app would. The workers wait for a start line on stdin so that they
//! fire together, and report each request's latency on stdout.
//!
//! Every run uses a fresh path (`/item/<run id>`) and, in Redis, its own key
//! namespace (`stampede:<run id>:`), so each run starts cold. At the end it
//! deletes the keys it stored, by name, and nothing else (tower-fence's own
//! lease and notification keys expire by themselves). Logs go to stderr;
//! `RUST_LOG` sets the filter (default `warn`).
//!
//! The example needs the `redis` feature (on by default).

use std::collections::HashMap;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bb8_redis::redis;
use bb8_redis::RedisConnectionManager;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Barrier;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tower::{service_fn, Layer as _, Service, ServiceExt as _};
use tower_fence::store::{MemoryStore, RedisPool};
use tower_fence::FenceLayer;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
usage: stampede [--requests N] [--origin-ms MS] [--redis URL] [--processes P]

  --requests N     concurrent requests for one cold key (default 500)
  --origin-ms MS   latency of each origin call, in ms (default 50)
  --redis URL      cache in this Redis (e.g. redis://127.0.0.1:6379) instead of memory
  --processes P    split the requests over P worker processes sharing the Redis
                   (default 1: everything in this process; P > 1 needs --redis)";

const DEFAULT_REQUESTS: usize = 500;
const DEFAULT_ORIGIN_MS: u64 = 50;
/// Size of the origin's response body.
const BODY_BYTES: usize = 1024;
/// How long both caches keep the response (the origin says `max-age=60`).
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Longest one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a worker may take to start and connect to Redis.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a worker may take to exit once its requests are done.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest opening a Redis connection may take.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Redis connections per process (bb8-redis connections are multiplexed).
const REDIS_POOL_SIZE: u32 = 8;
/// The start signal a worker waits for on stdin.
const GO: &str = "go";
/// What a worker prints once it is ready for [`GO`].
const READY: &str = "ready";
/// How a worker's fatal error starts on its stderr.
const WORKER_ERROR: &str = "stampede worker: ";

type BoxError = Box<dyn Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

// ---------------------------------------------------------------------------
// Arguments

/// The parent's settings.
#[derive(Debug)]
struct Args {
    requests: usize,
    origin_ms: u64,
    redis: Option<String>,
    processes: usize,
}

/// A worker's settings, from the parent (the hidden `--worker` flag).
#[derive(Debug)]
struct WorkerArgs {
    origin: String,
    redis: String,
    namespace: String,
    path: String,
    mode: Mode,
    count: usize,
}

#[derive(Debug)]
enum Invocation {
    Help,
    Run(Args),
    Worker(WorkerArgs),
}

/// Parses `--flag value` / `--flag=value` pairs into a map; `Err` on a
/// repeated, unknown or valueless flag.
fn flag_map(argv: &[String], known: &[&str]) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        if !known.contains(&flag) {
            return Err(if flag.starts_with('-') {
                format!("unknown option {flag:?}")
            } else {
                format!("unexpected argument {arg:?}")
            });
        }
        let value = match inline {
            Some(value) => value,
            None => match args.next() {
                Some(value) if !value.starts_with("--") => value.clone(),
                _ => return Err(format!("{flag} needs a value")),
            },
        };
        if value.is_empty() {
            return Err(format!("{flag} needs a value"));
        }
        if map.insert(flag.to_owned(), value).is_some() {
            return Err(format!("{flag} given twice"));
        }
    }
    Ok(map)
}

fn number<T: std::str::FromStr>(
    map: &HashMap<String, String>,
    flag: &str,
    default: T,
) -> Result<T, String> {
    match map.get(flag) {
        None => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| format!("{flag} {text:?} is not a whole number")),
    }
}

fn parse_args(argv: &[String]) -> Result<Invocation, String> {
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Invocation::Help);
    }
    if argv.first().map(String::as_str) == Some("--worker") {
        return parse_worker_args(&argv[1..]).map(Invocation::Worker);
    }
    let map = flag_map(
        argv,
        &["--requests", "--origin-ms", "--redis", "--processes"],
    )?;
    let requests = number(&map, "--requests", DEFAULT_REQUESTS)?;
    let origin_ms = number(&map, "--origin-ms", DEFAULT_ORIGIN_MS)?;
    let processes = number(&map, "--processes", 1)?;
    let redis = map.get("--redis").cloned();
    if requests == 0 {
        return Err("--requests must be at least 1".into());
    }
    if processes == 0 || processes > requests {
        return Err(format!(
            "--processes must be between 1 and the number of requests ({requests})"
        ));
    }
    if let Some(url) = &redis {
        use redis::IntoConnectionInfo as _;
        url.as_str()
            .into_connection_info()
            .map_err(|e| format!("--redis {url:?} is not a Redis URL: {e}"))?;
    }
    if processes > 1 && redis.is_none() {
        return Err(format!(
            "--processes {processes} needs --redis: the worker processes share their cache in Redis"
        ));
    }
    Ok(Invocation::Run(Args {
        requests,
        origin_ms,
        redis,
        processes,
    }))
}

fn parse_worker_args(argv: &[String]) -> Result<WorkerArgs, String> {
    let mut map = flag_map(
        argv,
        &[
            "--origin",
            "--redis",
            "--namespace",
            "--path",
            "--mode",
            "--count",
        ],
    )?;
    let mut take = |flag: &str| {
        map.remove(flag)
            .ok_or_else(|| format!("{flag} is required"))
    };
    let origin = take("--origin")?;
    let redis = take("--redis")?;
    let namespace = take("--namespace")?;
    let path = take("--path")?;
    let mode = take("--mode")?;
    let count = take("--count")?;
    let mode = match mode.as_str() {
        "naive" => Mode::Naive,
        "fence" => Mode::Fence,
        other => return Err(format!("--mode {other:?} is neither naive nor fence")),
    };
    let count = count
        .parse()
        .map_err(|_| format!("--count {count:?} is not a whole number"))?;
    Ok(WorkerArgs {
        origin,
        redis,
        namespace,
        path,
        mode,
        count,
    })
}

// ---------------------------------------------------------------------------
// The origin

/// A slow origin that counts its calls.
#[derive(Clone)]
struct Origin {
    calls: Arc<AtomicUsize>,
    latency: Duration,
    body: Bytes,
}

impl Origin {
    fn new(latency: Duration) -> Self {
        let mut body = String::with_capacity(BODY_BYTES);
        while body.len() < BODY_BYTES {
            body.push_str("the origin's slow answer; ");
        }
        body.truncate(BODY_BYTES - 1);
        body.push('\n');
        Origin {
            calls: Arc::new(AtomicUsize::new(0)),
            latency,
            body: Bytes::from(body),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/item/{id}", get(item))
            .with_state(self.clone())
    }
}

async fn item(State(origin): State<Origin>) -> impl IntoResponse {
    origin.calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(origin.latency).await;
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=60"),
        ],
        origin.body.clone(),
    )
}

// ---------------------------------------------------------------------------
// The two caches

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Naive,
    Fence,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Naive => "naive",
            Mode::Fence => "fence",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Naive => "naive cache-aside",
            Mode::Fence => "tower-fence",
        })
    }
}

/// Where the naive cache keeps bodies. The memory map never expires
/// anything: a run lasts well under the TTL.
#[derive(Clone)]
enum NaiveStore {
    Memory(Arc<Mutex<HashMap<String, Bytes>>>),
    Redis { pool: RedisPool, prefix: String },
}

impl NaiveStore {
    fn key(&self, path: &str) -> String {
        match self {
            NaiveStore::Memory(_) => path.to_owned(),
            NaiveStore::Redis { prefix, .. } => format!("{prefix}{path}"),
        }
    }

    async fn get(&self, path: &str) -> Result<Option<Bytes>, BoxError> {
        match self {
            NaiveStore::Memory(map) => {
                let map = map.lock().map_err(|_| "naive cache lock poisoned")?;
                Ok(map.get(path).cloned())
            }
            NaiveStore::Redis { pool, .. } => {
                let mut conn = pool.get().await?;
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(self.key(path))
                    .query_async(&mut *conn)
                    .await?;
                Ok(value.map(Bytes::from))
            }
        }
    }

    async fn set(&self, path: &str, body: Bytes) -> Result<(), BoxError> {
        match self {
            NaiveStore::Memory(map) => {
                let mut map = map.lock().map_err(|_| "naive cache lock poisoned")?;
                map.insert(path.to_owned(), body);
                Ok(())
            }
            NaiveStore::Redis { pool, .. } => {
                let mut conn = pool.get().await?;
                redis::cmd("SET")
                    .arg(self.key(path))
                    .arg(body.as_ref())
                    .arg("EX")
                    .arg(CACHE_TTL.as_secs())
                    .query_async::<()>(&mut *conn)
                    .await?;
                Ok(())
            }
        }
    }
}

/// Naive cache-aside as a tower `Service`: get; on a miss call the origin,
/// read its body, set it, answer.
#[derive(Clone)]
struct CacheAside<S> {
    inner: S,
    store: NaiveStore,
}

impl<S, B> Service<Request<Body>> for CacheAside<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Take the service that was polled ready; leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let store = self.store.clone();
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            if let Some(body) = store.get(&path).await? {
                let mut response = Response::new(Body::from(body));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                return Ok(response);
            }
            let response = inner.call(req).await.map_err(Into::into)?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(Into::into)?.to_bytes();
            if parts.status == StatusCode::OK {
                store.set(&path, body.clone()).await?;
            }
            Ok(Response::from_parts(parts, Body::from(body)))
        })
    }
}

/// A tower-fence layer caching in `pool`, or in memory without one.
fn fence_layer(pool: Option<RedisPool>, namespace: &str) -> Result<FenceLayer, BoxError> {
    let builder = FenceLayer::builder()
        .namespace(namespace)
        .default_ttl(CACHE_TTL);
    let builder = match pool {
        Some(pool) => builder.redis(pool),
        None => builder.store(MemoryStore::new(16 * 1024 * 1024)),
    };
    Ok(builder.build()?)
}

/// A bb8 pool on `url`, checked by one checkout. Connections are not
/// pinged at checkout, so a naive `GET` is one round trip, as a tower-fence
/// hit is.
async fn connect_redis(url: &str) -> Result<RedisPool, BoxError> {
    let manager = RedisConnectionManager::new(url)?;
    let pool = bb8::Pool::builder()
        .max_size(REDIS_POOL_SIZE)
        .min_idle(Some(REDIS_POOL_SIZE))
        .test_on_check_out(false)
        .connection_timeout(REDIS_CONNECT_TIMEOUT)
        .build(manager)
        .await
        .map_err(|e| format!("cannot reach Redis at {url}: {e}"))?;
    if let Err(err) = pool.get().await {
        return Err(format!("cannot reach Redis at {url}: {err}").into());
    }
    Ok(pool)
}

// ---------------------------------------------------------------------------
// Firing requests

/// One request's fate.
#[derive(Debug)]
struct Outcome {
    micros: u64,
    error: Option<String>,
}

/// Sends `count` GETs of `path` through clones of `service`, all released
/// at once by a barrier, and times each to the end of its body.
async fn fire<S, B>(service: S, path: &str, count: usize) -> Result<Vec<Outcome>, BoxError>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let barrier = Arc::new(Barrier::new(count + 1));
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let request = Request::get(path).body(Body::empty())?;
        let service = service.clone();
        let barrier = barrier.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            let started = Instant::now();
            let result = timeout(REQUEST_TIMEOUT, send(service, request)).await;
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let error = match result {
                Ok(Ok(())) => None,
                Ok(Err(err)) => Some(error_chain(err.as_ref())),
                Err(_) => Some(format!("no answer within {REQUEST_TIMEOUT:?}")),
            };
            Outcome { micros, error }
        });
    }
    barrier.wait().await;
    let mut outcomes = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        outcomes.push(joined.unwrap_or_else(|err| Outcome {
            micros: 0,
            error: Some(format!("request task failed: {err}")),
        }));
    }
    Ok(outcomes)
}

async fn send<S, B>(service: S, request: Request<Body>) -> Result<(), BoxError>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let response = service.oneshot(request).await.map_err(Into::into)?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(Into::into)?;
    let len = body.to_bytes().len();
    if status != StatusCode::OK {
        return Err(format!("status {status}").into());
    }
    if len != BODY_BYTES {
        return Err(format!("body of {len} bytes, expected {BODY_BYTES}").into());
    }
    Ok(())
}

/// An error and its sources on one line.
fn error_chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

// ---------------------------------------------------------------------------
// Results

/// One row of the table.
struct Row {
    mode: Mode,
    store: &'static str,
    processes: usize,
    requests: usize,
    origin_calls: usize,
    /// Latencies of the requests that succeeded, in µs.
    latencies: Vec<u64>,
    errors: usize,
}

impl Row {
    fn new(mode: Mode, args: &Args, origin_calls: usize, outcomes: &[Outcome]) -> Self {
        let mut latencies: Vec<u64> = outcomes
            .iter()
            .filter(|o| o.error.is_none())
            .map(|o| o.micros)
            .collect();
        latencies.sort_unstable();
        Row {
            mode,
            store: if args.redis.is_some() {
                "redis"
            } else {
                "memory"
            },
            processes: args.processes,
            requests: args.requests,
            origin_calls,
            errors: args.requests.saturating_sub(latencies.len()),
            latencies,
        }
    }

    /// The nearest-rank percentile `p` (0..=100) in ms, or `-` with no data.
    fn percentile(&self, p: usize) -> String {
        let n = self.latencies.len();
        if n == 0 {
            return "-".to_owned();
        }
        let rank = (n * p).div_ceil(100).clamp(1, n);
        format!("{:.1}", self.latencies[rank - 1] as f64 / 1000.0)
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<18} {:<6} {:>9} {:>8} {:>12} {:>8} {:>8} {:>8} {:>6}",
        "mode",
        "store",
        "processes",
        "requests",
        "origin calls",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors"
    );
    for row in rows {
        println!(
            "{:<18} {:<6} {:>9} {:>8} {:>12} {:>8} {:>8} {:>8} {:>6}",
            row.mode.to_string(),
            row.store,
            row.processes,
            row.requests,
            row.origin_calls,
            row.percentile(50),
            row.percentile(99),
            row.percentile(100),
            row.errors
        );
    }
}

/// Deletes the keys a Redis run stored (by name; nothing else).
async fn delete_keys(pool: &RedisPool, keys: &[String]) {
    let result = async {
        let mut conn = pool.get().await?;
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut *conn)
            .await?;
        Ok::<_, BoxError>(())
    }
    .await;
    if let Err(err) = result {
        eprintln!("stampede: could not delete this run's keys {keys:?}: {err}");
    }
}

// ---------------------------------------------------------------------------
// In-process mode

async fn run_in_process(args: &Args, run_id: &str) -> Result<Vec<Row>, BoxError> {
    let origin = Origin::new(Duration::from_millis(args.origin_ms));
    let path = format!("/item/{run_id}");
    let namespace = format!("stampede:{run_id}:");
    let pool = match &args.redis {
        Some(url) => Some(connect_redis(url).await?),
        None => None,
    };
    let mut rows = Vec::new();

    let store = match &pool {
        Some(pool) => NaiveStore::Redis {
            pool: pool.clone(),
            prefix: format!("{namespace}naive:"),
        },
        None => NaiveStore::Memory(Arc::default()),
    };
    let naive = CacheAside {
        inner: origin.router(),
        store: store.clone(),
    };
    let before = origin.calls();
    let outcomes = fire(naive, &path, args.requests).await?;
    rows.push(Row::new(
        Mode::Naive,
        args,
        origin.calls() - before,
        &outcomes,
    ));
    report_errors(Mode::Naive, &outcomes);

    let layer = fence_layer(pool.clone(), &namespace)?;
    let fenced = origin.router().layer(layer.clone());
    let before = origin.calls();
    let outcomes = fire(fenced, &path, args.requests).await?;
    rows.push(Row::new(
        Mode::Fence,
        args,
        origin.calls() - before,
        &outcomes,
    ));
    report_errors(Mode::Fence, &outcomes);

    if let Some(pool) = &pool {
        let fence_key = layer.cache_key(&Request::get(path.as_str()).body(())?);
        delete_keys(pool, &[store.key(&path), fence_key]).await;
    }
    Ok(rows)
}

/// Prints how many requests of `mode` failed and the first reason.
fn report_errors(mode: Mode, outcomes: &[Outcome]) {
    let mut failed = outcomes.iter().filter_map(|o| o.error.as_deref());
    if let Some(first) = failed.next() {
        eprintln!(
            "stampede: {mode}: {} request(s) failed, first: {first}",
            failed.count() + 1
        );
    }
}

// ---------------------------------------------------------------------------
// Multi-process mode: the parent

/// A started worker.
struct Worker {
    index: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    /// Forwards the worker's stderr and returns its last lines.
    stderr: JoinHandle<String>,
}

impl Worker {
    /// Kills the worker if it still runs and reaps it (bounded).
    async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = timeout(EXIT_TIMEOUT, self.child.wait()).await;
    }

    /// The worker's last stderr lines, once its stderr closed (bounded).
    async fn stderr_tail(&mut self) -> String {
        match timeout(EXIT_TIMEOUT, &mut self.stderr).await {
            Ok(Ok(tail)) if !tail.is_empty() => format!(": {tail}"),
            _ => String::new(),
        }
    }

    /// Reads stdout up to the ready line.
    async fn ready(&mut self) -> Result<(), String> {
        loop {
            match self.stdout.next_line().await {
                Ok(Some(line)) if line == READY => return Ok(()),
                Ok(Some(_)) => continue,
                Ok(None) => return Err("exited before it was ready".into()),
                Err(err) => return Err(format!("cannot read its output: {err}")),
            }
        }
    }

    /// Reads the worker's results to the end, waits for its exit and checks
    /// it sent `share` results. Outcomes it did not report are errors.
    async fn finish(mut self, share: usize) -> (Vec<Outcome>, Option<String>) {
        let mut outcomes = Vec::with_capacity(share);
        let read = timeout(REQUEST_TIMEOUT + READY_TIMEOUT, async {
            while let Some(line) = self.stdout.next_line().await? {
                if let Some(outcome) = parse_outcome(&line) {
                    outcomes.push(outcome);
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        let mut failure = match read {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(format!("cannot read its output: {err}")),
            Err(_) => Some("did not finish in time; killed".to_owned()),
        };
        if failure.is_some() {
            self.stop().await;
        }
        match timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => failure = failure.or(Some(format!("exited with {status}"))),
            Ok(Err(err)) => failure = failure.or(Some(format!("cannot wait for it: {err}"))),
            Err(_) => failure = failure.or(Some("did not exit in time; killed".to_owned())),
        }
        self.stop().await;
        if failure.is_none() && outcomes.len() != share {
            failure = Some(format!(
                "reported {} of its {share} requests",
                outcomes.len()
            ));
        }
        let failure = match failure {
            Some(reason) => {
                let index = self.index;
                Some(format!(
                    "worker {index} {reason}{}",
                    self.stderr_tail().await
                ))
            }
            None => None,
        };
        while outcomes.len() < share {
            outcomes.push(Outcome {
                micros: 0,
                error: Some(format!("worker {} did not report it", self.index)),
            });
        }
        (outcomes, failure)
    }
}

fn parse_outcome(line: &str) -> Option<Outcome> {
    let mut parts = line.splitn(3, ' ');
    let kind = parts.next()?;
    let micros = parts.next()?.parse().ok()?;
    match kind {
        "ok" => Some(Outcome {
            micros,
            error: None,
        }),
        "err" => Some(Outcome {
            micros,
            error: Some(parts.next().unwrap_or("error").to_owned()),
        }),
        _ => None,
    }
}

/// What every worker of one mode is told.
struct Job<'a> {
    mode: Mode,
    origin: &'a str,
    redis: &'a str,
    namespace: &'a str,
    path: &'a str,
}

fn spawn_worker(index: usize, job: &Job<'_>, count: usize) -> Result<Worker, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut child = Command::new(exe)
        .arg("--worker")
        .args(["--origin", job.origin])
        .args(["--redis", job.redis])
        .args(["--namespace", job.namespace])
        .args(["--path", job.path])
        .args(["--mode", job.mode.arg()])
        .args(["--count", &count.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start worker {index}: {e}"))?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(format!("worker {index} has no pipes"));
    };
    // Forward the worker's stderr, and keep what explains a failure: its
    // own last error line, else its first lines (a panic message).
    let stderr = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let (mut fatal, mut first) = (None, Vec::new());
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[worker {index}] {line}");
            if let Some(error) = line.strip_prefix(WORKER_ERROR) {
                fatal = Some(error.to_owned());
            } else if first.len() < 3 && !line.trim().is_empty() {
                first.push(line);
            }
        }
        fatal.unwrap_or_else(|| first.join(" / "))
    });
    Ok(Worker {
        index,
        child,
        stdin: Some(stdin),
        stdout: BufReader::new(stdout).lines(),
        stderr,
    })
}

/// Runs one mode over `shares.len()` workers: start them, wait until all
/// are ready, release them together, gather their latencies. Returns the
/// outcomes (unreported requests as errors) and the workers' failures.
async fn run_workers(job: &Job<'_>, shares: &[usize]) -> (Vec<Outcome>, Vec<String>) {
    let total: usize = shares.iter().sum();
    let all_failed = |reason: &str| {
        (0..total)
            .map(|_| Outcome {
                micros: 0,
                error: Some(reason.to_owned()),
            })
            .collect::<Vec<_>>()
    };

    let mut workers = Vec::with_capacity(shares.len());
    let mut failures = Vec::new();
    for (index, &count) in shares.iter().enumerate() {
        match spawn_worker(index, job, count) {
            Ok(worker) => workers.push(worker),
            Err(err) => {
                failures.push(err);
                break;
            }
        }
    }
    if failures.is_empty() {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        for worker in &mut workers {
            let ready = tokio::time::timeout_at(deadline, worker.ready()).await;
            let reason = match ready {
                Ok(Ok(())) => continue,
                Ok(Err(reason)) => reason,
                Err(_) => format!("was not ready within {READY_TIMEOUT:?}"),
            };
            worker.stop().await;
            let index = worker.index;
            let tail = worker.stderr_tail().await;
            failures.push(format!("worker {index} {reason}{tail}"));
            break;
        }
    }
    if !failures.is_empty() {
        for worker in &mut workers {
            worker.stop().await;
        }
        return (all_failed("the workers did not start"), failures);
    }

    // Everyone is waiting on stdin: release them together.
    for worker in &mut workers {
        if let Some(mut stdin) = worker.stdin.take() {
            let sent = async {
                stdin.write_all(format!("{GO}\n").as_bytes()).await?;
                stdin.flush().await
            }
            .await;
            if let Err(err) = sent {
                failures.push(format!(
                    "worker {}: cannot send the start signal: {err}",
                    worker.index
                ));
            }
        }
    }

    let mut tasks = JoinSet::new();
    for (worker, &share) in workers.into_iter().zip(shares) {
        tasks.spawn(worker.finish(share));
    }
    let mut outcomes = Vec::with_capacity(total);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((mut got, failure)) => {
                outcomes.append(&mut got);
                failures.extend(failure);
            }
            Err(err) => failures.push(format!("a worker task failed: {err}")),
        }
    }
    while outcomes.len() < total {
        outcomes.push(Outcome {
            micros: 0,
            error: Some("lost".to_owned()),
        });
    }
    (outcomes, failures)
}

async fn run_multi_process(
    args: &Args,
    run_id: &str,
    redis_url: &str,
) -> Result<(Vec<Row>, Vec<String>), BoxError> {
    // Fail early, before starting any worker, if Redis is not there.
    let pool = connect_redis(redis_url).await?;
    let origin = Origin::new(Duration::from_millis(args.origin_ms));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin_url = format!("http://{}", listener.local_addr()?);
    let router = origin.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let path = format!("/item/{run_id}");
    let namespace = format!("stampede:{run_id}:");
    let shares: Vec<usize> = (0..args.processes)
        .map(|i| args.requests / args.processes + usize::from(i < args.requests % args.processes))
        .collect();

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for mode in [Mode::Naive, Mode::Fence] {
        let job = Job {
            mode,
            origin: &origin_url,
            redis: redis_url,
            namespace: &namespace,
            path: &path,
        };
        let before = origin.calls();
        let (outcomes, mut failed) = run_workers(&job, &shares).await;
        rows.push(Row::new(mode, args, origin.calls() - before, &outcomes));
        report_errors(mode, &outcomes);
        failures.append(&mut failed);
    }
    server.abort();

    let naive_key = NaiveStore::Redis {
        pool: pool.clone(),
        prefix: format!("{namespace}naive:"),
    }
    .key(&path);
    let fence_key =
        fence_layer(None, &namespace)?.cache_key(&Request::get(path.as_str()).body(())?);
    delete_keys(&pool, &[naive_key, fence_key]).await;
    Ok((rows, failures))
}

// ---------------------------------------------------------------------------
// Multi-process mode: a worker

async fn worker(args: WorkerArgs) -> Result<(), BoxError> {
    let pool = connect_redis(&args.redis).await?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let base = args.origin.trim_end_matches('/').to_owned();
    // The origin, over HTTP: every request goes to the parent's server.
    let origin = service_fn(move |req: Request<Body>| {
        let client = client.clone();
        let uri = format!("{base}{}", req.uri().path());
        async move {
            let uri: Uri = uri.parse()?;
            let response = client
                .request(Request::get(uri).body(Empty::new())?)
                .await?;
            Ok::<_, BoxError>(response)
        }
    });

    let outcomes = match args.mode {
        Mode::Naive => {
            let service = CacheAside {
                inner: origin,
                store: NaiveStore::Redis {
                    pool,
                    prefix: format!("{}naive:", args.namespace),
                },
            };
            wait_for_go().await?;
            fire(service, &args.path, args.count).await?
        }
        Mode::Fence => {
            let service = fence_layer(Some(pool), &args.namespace)?.layer(origin);
            wait_for_go().await?;
            fire(service, &args.path, args.count).await?
        }
    };

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for outcome in outcomes {
        match outcome.error {
            None => writeln!(out, "ok {}", outcome.micros)?,
            Some(err) => writeln!(out, "err {} {}", outcome.micros, err.replace('\n', " "))?,
        }
    }
    out.flush()?;
    Ok(())
}

/// Says it is ready and waits for the parent's start line.
async fn wait_for_go() -> Result<(), BoxError> {
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{READY}")?;
        stdout.flush()?;
    }
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    if line.trim() != GO {
        return Err("no start signal from the parent".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------

/// A run id unique enough for a key: the pid and the clock.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(&argv) {
        Ok(command) => command,
        Err(reason) => {
            eprintln!("stampede: {reason}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let args = match command {
        Invocation::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        Invocation::Worker(args) => {
            if let Err(err) = worker(args).await {
                eprintln!("{WORKER_ERROR}{}", error_chain(err.as_ref()));
                std::process::exit(1);
            }
            return Ok(());
        }
        Invocation::Run(args) => args,
    };

    let run_id = run_id();
    println!(
        "{} concurrent GETs of one cold key, origin latency {} ms, {} store, {} process(es), run {run_id}",
        args.requests,
        args.origin_ms,
        if args.redis.is_some() { "redis" } else { "memory" },
        args.processes
    );
    let (rows, failures) = match (&args.redis, args.processes) {
        (Some(url), p) if p > 1 => run_multi_process(&args, &run_id, url).await?,
        _ => (run_in_process(&args, &run_id).await?, Vec::new()),
    };
    println!();
    print_table(&rows);
    if !failures.is_empty() {
        for failure in &failures {
            eprintln!("stampede: {failure}");
        }
        std::process::exit(1);
    }
    Ok(())
}
