//! Run with: cargo run --release --example soak -- [--duration 60s] [--workers 16] [--seed N] [--redis redis://127.0.0.1:PORT]
//!
//! A soak test of three tower-fence layers sharing one Redis, as three
//! instances of an app would, with Redis killed and restarted, and later
//! frozen, while traffic runs. It checks every answer and prints, per phase
//! and in total: requests, failures, wrong answers, stale-after-write reads
//! (the targets for these three are 0, 0, 0) and cache hits. It exits with
//! status 1 when any target is missed, 2 when it could not run.
//!
//! # What runs
//!
//! - **One origin**, an in-process tower service over 50 paths
//!   (`/users/0..20`, `/products/0..20`, `/orders/0..10`) that keeps a
//!   version per path. `GET` reads the version, takes 2 ms, and answers
//!   `200` with the body `path@version`, `Cache-Control: max-age=5`, and for
//!   products a `Surrogate-Key: catalog-N` tag (N = id mod 4). `PUT`,
//!   `POST` and `DELETE` take 2 ms, bump the version and answer `200` with
//!   the new `path@version`.
//! - **Three layers** over that origin, each with its own bb8 pool (four
//!   connections, 1 s connection timeout) on the same Redis and namespace,
//!   with small, realistic timeouts: `store_timeout` 50 ms,
//!   `invalidation_timeout` 500 ms, `wait_timeout` 500 ms, `lease_ttl` 2 s;
//!   writes invalidate inline (the default).
//! - **Workers** (`--workers`, default 16 tokio tasks) loop until the end,
//!   pausing 0–2 ms between operations, and pick per operation (paths
//!   skewed so that a few are hot):
//!   - 88 %: a `GET` through a random layer;
//!   - 9 %: a `PUT`, `POST` or `DELETE` through a random layer (it bumps the
//!     version and the layer invalidates the path and what is under it
//!     before answering);
//!   - 3 %: an application-side change: bump versions in the origin
//!     directly, then call a random layer's `Invalidator`:
//!     `invalidate_prefix` of a collection (`/users`) or of one item, or
//!     `invalidate_tag` of a catalog group after bumping all its products.
//!     A call that fails is retried every 100 ms for up to 10 s, as a job
//!     that must get its change out would.
//!
//! # What is checked
//!
//! - **failure**: an answer the origin did not give: a status other than
//!   `200`, or no complete answer within 10 s. An `Invalidator` call still
//!   failing after 10 s of retries also counts as a failure.
//! - **wrong**: a body that is not `path@v` for the requested path and a
//!   version `v` the origin has had for it.
//! - **stale-after-write**: a `GET` that started after a write of its path
//!   had completed (the write's response came back, on any layer, or the
//!   `Invalidator` call returned `Ok`) but returned an older version.
//! - **hits**: `GET`s whose `Cache-Status` says `hit`; **bypass**: `GET`s
//!   the layer sent to the origin past a failing store (`fwd=bypass`, fail
//!   open). Not targets: they show what the faults cost.
//!
//! Stale reads are also broken down by the kind of write they missed (one
//! through the same layer, through another layer, or each kind of
//! `Invalidator` call), with the longest time between a write and a read
//! that still missed it, and a few samples with their `Cache-Status`.
//!
//! # Phases
//!
//! The run (`--duration`, default 60 s) is cut in thirds; each request
//! belongs to the third it started in:
//!
//! 1. **warm**: traffic only.
//! 2. **restart**: a quarter into the third, the Redis this program started
//!    is killed with `kill -9`, stays down for 2 s (less on short runs), and
//!    is started again on the same port with the same arguments, empty.
//! 3. **freeze**: a quarter into the third, Redis is stopped with `SIGSTOP`
//!    for 3 s (less on short runs), then continued with `SIGCONT`.
//!
//! It also prints how long after the restart and after the freeze the first
//! hit came back, the layers' `stats()`, and samples of what went wrong
//! (the first few of each kind; for stale reads also the one with the
//! longest lag).
//!
//! Without `--redis` it starts a private `redis-server` (from `PATH`, or
//! `REDIS_SERVER_BIN`) on a free loopback port with `--save "" --appendonly
//! no` and kills it at the end. With `--redis URL` it uses that server,
//! under a namespace of its own (`soak:<run id>:`; its entries are removed
//! at the end, its tag sets expire with them within 5 s, and the layers
//! append to the capped fill-notification stream `tower-fence:fills`), and
//! skips the restart and the freeze: it cannot kill a server it did not
//! start. Logs go to stderr; `RUST_LOG` sets the filter (default `error`:
//! the layers warn about every failed store call, and the faults make
//! thousands).
//!
//! The example needs the `redis` feature (on by default).

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bb8_redis::redis::{self, IntoConnectionInfo as _};
use bb8_redis::{bb8, RedisConnectionManager};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tower::{Layer as _, Service, ServiceExt as _};
use tower_fence::{FenceLayer, FenceService, Stats};
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn Error + Send + Sync>;

const USAGE: &str = "\
usage: soak [--duration 60s] [--workers 16] [--seed N] [--redis URL]

  --duration D   how long the traffic runs: 60s, 90, 2m, 20000ms (default 60s, at least 9s)
  --workers N    concurrent client tasks (default 16)
  --seed N       seed of the operation mix (default: from the clock; printed)
  --redis URL    use this Redis instead of starting a private redis-server;
                 the restart and freeze phases are then skipped";

const DEFAULT_DURATION: Duration = Duration::from_secs(60);
const MIN_DURATION: Duration = Duration::from_secs(9);
const DEFAULT_WORKERS: usize = 16;
/// Layers over the one origin, like instances of an app.
const LAYERS: usize = 3;
/// Connections in each layer's pool (bb8-redis connections are multiplexed).
const POOL_SIZE: u32 = 4;
/// Longest a pool checkout waits for a connection.
const POOL_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// The layers' timeouts: small, as an app that must stay fast would set.
const STORE_TIMEOUT: Duration = Duration::from_millis(50);
const INVALIDATION_TIMEOUT: Duration = Duration::from_millis(500);
const WAIT_TIMEOUT: Duration = Duration::from_millis(500);
const LEASE_TTL: Duration = Duration::from_secs(2);
/// `Cache-Control` of the origin's `GET` responses: short, so entries
/// expire and are rebuilt (and refreshed early) during the run.
const ORIGIN_CACHE_CONTROL: &str = "max-age=5";
/// How long each origin call takes.
const ORIGIN_LATENCY: Duration = Duration::from_millis(2);
/// Longest a request may take before it counts as a failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an application-side invalidation is retried.
const INVALIDATE_RETRY_FOR: Duration = Duration::from_secs(10);
const INVALIDATE_RETRY_EVERY: Duration = Duration::from_millis(100);
/// The operation mix, in percent: reads, writes through a layer, the rest
/// application-side invalidations.
const READ_PERCENT: u32 = 88;
const WRITE_PERCENT: u32 = 9;
/// Longest pause of a worker between two operations, in ms.
const MAX_PAUSE_MS: u64 = 2;
/// Longest Redis stays down in the restart phase, and frozen in the freeze
/// phase (shorter on short runs).
const MAX_DOWN: Duration = Duration::from_secs(2);
const MAX_FREEZE: Duration = Duration::from_secs(3);
/// How often a server that exits at once (a port race) is started again.
const SPAWN_ATTEMPTS: usize = 5;
/// How long a (re)started server gets to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many samples of each kind of problem are printed.
const SAMPLES: usize = 8;
/// How many samples of stale reads are printed per kind of write missed.
const STALE_SAMPLES: usize = 3;
/// The collections of the origin: prefix and number of items.
const COLLECTIONS: [(&str, usize); 3] = [("/users", 20), ("/products", 20), ("/orders", 10)];
/// Products are tagged `catalog-{id % CATALOG_GROUPS}`.
const CATALOG_GROUPS: usize = 4;

const MISSING_SERVER_HINT: &str = "not found: without --redis this example starts its own \
Redis. Install it (`sudo apt-get install redis-server` on Debian/Ubuntu, `brew install redis` \
on macOS), set REDIS_SERVER_BIN to its path, or pass --redis redis://127.0.0.1:PORT (then the \
restart and freeze phases are skipped)";

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// Arguments

#[derive(Debug)]
struct Args {
    duration: Duration,
    workers: usize,
    seed: u64,
    redis: Option<String>,
}

enum Invocation {
    Help,
    Run(Args),
}

fn parse_args(argv: &[String]) -> Result<Invocation, String> {
    let mut args = Args {
        duration: DEFAULT_DURATION,
        workers: DEFAULT_WORKERS,
        seed: clock_seed(),
        redis: None,
    };
    let mut seen = Vec::new();
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(Invocation::Help);
        }
        if !["--duration", "--workers", "--seed", "--redis"].contains(&flag) {
            return Err(format!("unknown argument {arg:?}"));
        }
        if seen.contains(&flag) {
            return Err(format!("{flag} given twice"));
        }
        seen.push(flag);
        let value = match inline {
            Some(value) => value,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))?,
        };
        match flag {
            "--duration" => args.duration = parse_duration(&value)?,
            "--workers" => {
                args.workers = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--workers {value:?} is not a positive count"))?;
            }
            "--seed" => {
                args.seed = value
                    .parse()
                    .map_err(|_| format!("--seed {value:?} is not a whole number"))?;
            }
            _ => {
                value
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| format!("--redis {value:?} is not a Redis URL: {e}"))?;
                args.redis = Some(value);
            }
        }
    }
    if args.duration < MIN_DURATION {
        return Err(format!(
            "--duration must be at least {}s (three phases with a fault each)",
            MIN_DURATION.as_secs()
        ));
    }
    Ok(Invocation::Run(args))
}

/// `60s`, `60`, `2m`, `1m30s`, `20000ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("--duration {text:?} is not a duration (60s, 2m, 1m30s, 20000ms)");
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit] {
            "" | "s" => Duration::from_secs(number),
            "ms" => Duration::from_millis(number),
            "m" | "min" => Duration::from_secs(number.saturating_mul(60)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
        rest = &rest[unit..];
    }
    Ok(total)
}

fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// A private redis-server that can be killed, restarted and frozen

/// A `redis-server` this program started; killed when dropped.
struct RedisServer {
    bin: PathBuf,
    port: u16,
    child: Child,
}

enum Ready {
    Yes,
    Exited(String),
}

impl RedisServer {
    async fn start() -> Result<Self, BoxError> {
        let bin = std::env::var_os("REDIS_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let mut last_exit = String::new();
        for _ in 0..SPAWN_ATTEMPTS {
            let port = free_port()?;
            let child = spawn_server(&bin, port)?;
            let mut server = RedisServer {
                bin: bin.clone(),
                port,
                child,
            };
            match server.wait_ready().await? {
                Ready::Yes => return Ok(server),
                // Most likely the port was taken meanwhile: try another.
                Ready::Exited(status) => last_exit = status,
            }
        }
        Err(format!(
            "{} exited at once {SPAWN_ATTEMPTS} times (last: {last_exit})",
            bin.display()
        )
        .into())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> Result<u32, BoxError> {
        self.child
            .id()
            .ok_or_else(|| "redis-server is not running".into())
    }

    /// `kill -9` on the server's pid, and reaps it.
    async fn kill(&mut self) -> Result<(), BoxError> {
        signal(self.pid()?, "-9").await?;
        self.child.wait().await?;
        Ok(())
    }

    /// Starts the server again on the same port with the same arguments
    /// and waits until it answers. It starts empty (no persistence).
    async fn restart(&mut self) -> Result<(), BoxError> {
        let mut last_exit = String::new();
        for attempt in 0..SPAWN_ATTEMPTS {
            if attempt > 0 {
                // The port is fixed now: back off instead of moving.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            self.child = spawn_server(&self.bin, self.port)?;
            match self.wait_ready().await? {
                Ready::Yes => return Ok(()),
                Ready::Exited(status) => last_exit = status,
            }
        }
        Err(format!(
            "redis-server did not start again on port {} (last: {last_exit})",
            self.port
        )
        .into())
    }

    /// Freezes the server: connections stay open, nothing answers.
    async fn pause(&self) -> Result<(), BoxError> {
        signal(self.pid()?, "-STOP").await
    }

    /// Thaws a paused server.
    async fn resume(&self) -> Result<(), BoxError> {
        signal(self.pid()?, "-CONT").await
    }

    /// Waits until the child answers on its port (and is the one that
    /// answers), or exits.
    async fn wait_ready(&mut self) -> Result<Ready, BoxError> {
        let client = redis::Client::open(self.url())?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let want = self.pid()?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Ready::Exited(status.to_string()));
            }
            let probe = async {
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                let info: String = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                info.lines()
                    .find_map(|line| line.strip_prefix("process_id:"))
                    .and_then(|pid| pid.trim().parse::<u32>().ok())
            };
            if let Ok(Some(pid)) = tokio::time::timeout(Duration::from_millis(500), probe).await {
                if pid == want {
                    return Ok(Ready::Yes);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on port {} did not answer within {READY_TIMEOUT:?}",
                    self.port
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn spawn_server(bin: &Path, port: u16) -> Result<Child, BoxError> {
    let spawned = Command::new(bin)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    match spawned {
        Ok(child) => Ok(child),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{} {MISSING_SERVER_HINT}", bin.display()).into())
        }
        Err(err) => Err(format!("cannot start {}: {err}", bin.display()).into()),
    }
}

async fn signal(pid: u32, sig: &str) -> Result<(), BoxError> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .await
        .map_err(|e| format!("kill {sig} {pid}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid}: {status}").into())
    }
}

/// A free loopback port (bind `127.0.0.1:0`), never 6379.
fn free_port() -> std::io::Result<u16> {
    loop {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        if port != 6379 {
            return Ok(port);
        }
    }
}

// ---------------------------------------------------------------------------
// The origin

/// The application's data: one version per path, bumped by writes.
struct Origin {
    paths: Vec<String>,
    tags: Vec<Option<String>>,
    ids: HashMap<String, usize>,
    versions: Vec<AtomicU64>,
}

impl Origin {
    fn new() -> Self {
        let mut paths = Vec::new();
        let mut tags = Vec::new();
        for (prefix, count) in COLLECTIONS {
            for i in 0..count {
                paths.push(format!("{prefix}/{i}"));
                tags.push((prefix == "/products").then(|| catalog_tag(i % CATALOG_GROUPS)));
            }
        }
        let ids = paths
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i))
            .collect();
        let versions = paths.iter().map(|_| AtomicU64::new(0)).collect();
        Origin {
            paths,
            tags,
            ids,
            versions,
        }
    }

    fn version(&self, id: usize) -> u64 {
        self.versions[id].load(Ordering::SeqCst)
    }

    /// Bumps the version of `id` and returns the new one.
    fn bump(&self, id: usize) -> u64 {
        self.versions[id].fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Ids of the paths of collection `c` of [`COLLECTIONS`].
    fn collection(&self, c: usize) -> std::ops::Range<usize> {
        let start: usize = COLLECTIONS[..c].iter().map(|(_, n)| n).sum();
        start..start + COLLECTIONS[c].1
    }

    async fn handle(&self, req: Request<Empty<Bytes>>) -> Response<Full<Bytes>> {
        let Some(&id) = self.ids.get(req.uri().path()) else {
            return plain(StatusCode::NOT_FOUND, "no such path".into());
        };
        let path = &self.paths[id];
        match *req.method() {
            Method::GET | Method::HEAD => {
                // Read first, answer later: a write may land in between, so
                // a rebuild can carry an old version into a fill.
                let version = self.version(id);
                tokio::time::sleep(ORIGIN_LATENCY).await;
                let mut response = plain(StatusCode::OK, format!("{path}@{version}"));
                let headers = response.headers_mut();
                headers.insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static(ORIGIN_CACHE_CONTROL),
                );
                if let Some(tag) = &self.tags[id] {
                    if let Ok(value) = HeaderValue::from_str(tag) {
                        headers.insert("surrogate-key", value);
                    }
                }
                response
            }
            Method::PUT | Method::POST | Method::DELETE => {
                tokio::time::sleep(ORIGIN_LATENCY).await;
                let version = self.bump(id);
                let mut response = plain(StatusCode::OK, format!("{path}@{version}"));
                response
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
            _ => plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into()),
        }
    }
}

fn catalog_tag(group: usize) -> String {
    format!("catalog-{group}")
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The origin as a tower service, shared by all layers.
#[derive(Clone)]
struct OriginService(Arc<Origin>);

impl Service<Request<Empty<Bytes>>> for OriginService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Empty<Bytes>>) -> Self::Future {
        let origin = self.0.clone();
        Box::pin(async move { Ok(origin.handle(req).await) })
    }
}

/// `path@version` → version, if the path is `path`.
fn parse_body(body: &[u8], path: &str) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let (got_path, version) = text.rsplit_once('@')?;
    if got_path != path {
        return None;
    }
    version.parse().ok()
}

// ---------------------------------------------------------------------------
// What has been written, and what each phase saw

/// An application-side change and how it is invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A few items of a collection; `invalidate_prefix` of the collection.
    Collection,
    /// One item; `invalidate_prefix` of its path.
    Item,
    /// All products of a catalog group; `invalidate_tag` of the group.
    Tag,
}

/// Who made a write: a layer (by index), or application code that called
/// a layer's `Invalidator`.
#[derive(Debug, Clone, Copy)]
enum Writer {
    Layer(usize),
    Invalidator(usize, Change),
}

/// What a stale read missed, for the breakdown.
const CAUSES: [&str; 5] = [
    "write through the same layer",
    "write through another layer",
    "invalidate_prefix call on a collection",
    "invalidate_prefix call on the item",
    "invalidate_tag call",
];

impl Writer {
    /// Index into [`CAUSES`] for a read through `reader`.
    fn cause(self, reader: usize) -> usize {
        match self {
            Writer::Layer(l) if l == reader => 0,
            Writer::Layer(_) => 1,
            Writer::Invalidator(_, Change::Collection) => 2,
            Writer::Invalidator(_, Change::Item) => 3,
            Writer::Invalidator(_, Change::Tag) => 4,
        }
    }

    fn describe(self) -> String {
        match self {
            Writer::Layer(l) => format!("a write through layer {l}"),
            Writer::Invalidator(l, change) => {
                let call = match change {
                    Change::Tag => "invalidate_tag",
                    Change::Collection | Change::Item => "invalidate_prefix",
                };
                format!("{call} through layer {l}'s Invalidator")
            }
        }
    }
}

/// The newest completed write of a path.
#[derive(Debug, Clone, Copy)]
struct LastWrite {
    version: u64,
    at: Instant,
    by: Writer,
}

/// Per path, the newest version whose write has completed.
struct Ledger {
    paths: Mutex<Vec<Option<LastWrite>>>,
}

impl Ledger {
    fn new(paths: usize) -> Self {
        Ledger {
            paths: Mutex::new(vec![None; paths]),
        }
    }

    fn last(&self, id: usize) -> Option<LastWrite> {
        lock(&self.paths)[id]
    }

    fn completed(&self, id: usize, version: u64, by: Writer) {
        let mut paths = lock(&self.paths);
        let slot = &mut paths[id];
        if slot.is_none_or(|last| last.version < version) {
            *slot = Some(LastWrite {
                version,
                at: Instant::now(),
                by,
            });
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warm,
    Restart,
    Freeze,
}

const PHASES: [Phase; 3] = [Phase::Warm, Phase::Restart, Phase::Freeze];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Warm => "warm",
            Phase::Restart => "restart",
            Phase::Freeze => "freeze",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default, Clone)]
struct Tally {
    requests: u64,
    gets: u64,
    writes: u64,
    failures: u64,
    wrong: u64,
    stale: u64,
    hits: u64,
    /// `GET`s the layer sent past the store (`fwd=bypass`): fail-open.
    bypasses: u64,
    app_invalidations: u64,
    app_retries: u64,
    get_micros: Vec<u32>,
    write_micros: Vec<u32>,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.gets += other.gets;
        self.writes += other.writes;
        self.failures += other.failures;
        self.wrong += other.wrong;
        self.stale += other.stale;
        self.hits += other.hits;
        self.bypasses += other.bypasses;
        self.app_invalidations += other.app_invalidations;
        self.app_retries += other.app_retries;
        self.get_micros.extend_from_slice(&other.get_micros);
        self.write_micros.extend_from_slice(&other.write_micros);
    }
}

/// A fault and when the first hit after it came back.
#[derive(Default, Clone, Copy)]
struct Fault {
    /// When the fault began (kill, SIGSTOP), since the start.
    began: Option<Duration>,
    /// When Redis was back (answering after the restart, SIGCONT), since
    /// the start.
    ended: Option<Duration>,
    /// First hit of a `GET` that started after `ended`: its answer's time
    /// since `ended`.
    first_hit_after: Option<Duration>,
}

#[derive(Default)]
struct Report {
    phases: [Tally; 3],
    restart: Fault,
    freeze: Fault,
    failure_samples: Vec<String>,
    wrong_samples: Vec<String>,
    /// Stale reads by what they missed ([`CAUSES`]).
    stale: [StaleCause; CAUSES.len()],
}

/// The stale reads that missed one kind of write.
#[derive(Default)]
struct StaleCause {
    per_phase: [u64; 3],
    /// Hits among them (the rest came from a shared rebuild or read).
    hits: u64,
    /// Longest time between the write's completion and the start of a read
    /// that still missed it.
    worst_lag: Duration,
    /// The read with the longest lag.
    worst: Option<String>,
    samples: Vec<String>,
}

/// The shared state of a run.
struct Soak {
    origin: Arc<Origin>,
    services: Vec<FenceService<OriginService>>,
    layers: Vec<FenceLayer>,
    ledger: Ledger,
    start: Instant,
    duration: Duration,
    report: Mutex<Report>,
}

enum Answer {
    Status(StatusCode, String),
    Body {
        version: Option<u64>,
        cache_status: String,
    },
    TimedOut,
}

impl Soak {
    fn since_start(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }

    fn phase_of(&self, at: Instant) -> Phase {
        let t = self.since_start(at);
        if t < self.duration / 3 {
            Phase::Warm
        } else if t < self.duration * 2 / 3 {
            Phase::Restart
        } else {
            Phase::Freeze
        }
    }

    /// Paths skewed towards low ids of each collection, so some are hot.
    fn pick_path(&self, rng: &mut fastrand::Rng) -> usize {
        let c = rng.usize(0..COLLECTIONS.len());
        let range = self.origin.collection(c);
        let skewed = (rng.f64() * rng.f64() * range.len() as f64) as usize;
        range.start + skewed.min(range.len() - 1)
    }

    async fn send(&self, layer: usize, method: Method, path: &str) -> Answer {
        let request = match Request::builder()
            .method(method)
            .uri(path)
            .body(Empty::<Bytes>::new())
        {
            Ok(request) => request,
            Err(err) => return Answer::Status(StatusCode::BAD_REQUEST, err.to_string()),
        };
        let service = self.services[layer].clone();
        let exchange = async move {
            let response = match service.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let (parts, body) = response.into_parts();
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            (parts, body)
        };
        let Ok((parts, body)) = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await else {
            return Answer::TimedOut;
        };
        if parts.status != StatusCode::OK {
            return Answer::Status(parts.status, String::from_utf8_lossy(&body).into_owned());
        }
        let cache_status = parts
            .headers
            .get_all("cache-status")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        Answer::Body {
            version: parse_body(&body, path),
            cache_status,
        }
    }

    async fn read(&self, rng: &mut fastrand::Rng) {
        let id = self.pick_path(rng);
        let layer = rng.usize(0..LAYERS);
        let path = &self.origin.paths[id];
        let before = self.ledger.last(id);
        let started = Instant::now();
        let answer = self.send(layer, Method::GET, path).await;
        let ended = Instant::now();
        let at = self.since_start(started);
        let mut report = lock(&self.report);
        let report = &mut *report;
        let tally = &mut report.phases[self.phase_of(started).index()];
        tally.requests += 1;
        tally.gets += 1;
        tally.get_micros.push(micros(ended - started));
        match answer {
            Answer::TimedOut => {
                tally.failures += 1;
                sample(
                    &mut report.failure_samples,
                    format!("{at:.1?}: GET {path} via layer {layer}: no answer within {REQUEST_TIMEOUT:?}"),
                );
            }
            Answer::Status(status, body) => {
                tally.failures += 1;
                sample(
                    &mut report.failure_samples,
                    format!("{at:.1?}: GET {path} via layer {layer}: {status} {body:?}"),
                );
            }
            Answer::Body {
                version,
                cache_status,
            } => {
                let hit = has_param(&cache_status, "hit");
                tally.hits += u64::from(hit);
                tally.bypasses += u64::from(has_param(&cache_status, "fwd=bypass"));
                let version = match version {
                    Some(v) if v <= self.origin.version(id) => v,
                    _ => {
                        tally.wrong += 1;
                        sample(
                            &mut report.wrong_samples,
                            format!("{at:.1?}: GET {path} via layer {layer}: {version:?} [{cache_status}]"),
                        );
                        return;
                    }
                };
                if let Some(last) = before.filter(|last| version < last.version) {
                    tally.stale += 1;
                    let lag = started.saturating_duration_since(last.at);
                    let cause = &mut report.stale[last.by.cause(layer)];
                    cause.per_phase[self.phase_of(started).index()] += 1;
                    cause.hits += u64::from(hit);
                    let line = format!(
                        "{at:.1?}: GET {path} via layer {layer} got @{version}, {lag:.1?} after {} completed @{} [{cache_status}]",
                        last.by.describe(),
                        last.version
                    );
                    if lag > cause.worst_lag || cause.worst.is_none() {
                        cause.worst_lag = lag;
                        cause.worst = Some(line.clone());
                    }
                    if cause.samples.len() < STALE_SAMPLES {
                        cause.samples.push(line);
                    }
                }
                if hit {
                    for fault in [&mut report.restart, &mut report.freeze] {
                        if let Some(back) = fault.ended {
                            if at >= back && fault.first_hit_after.is_none() {
                                fault.first_hit_after =
                                    Some(self.since_start(ended).saturating_sub(back));
                            }
                        }
                    }
                }
            }
        }
    }

    async fn write(&self, rng: &mut fastrand::Rng) {
        let id = self.pick_path(rng);
        let layer = rng.usize(0..LAYERS);
        let method = [Method::PUT, Method::POST, Method::DELETE][rng.usize(0..3)].clone();
        let path = &self.origin.paths[id];
        let started = Instant::now();
        let answer = self.send(layer, method.clone(), path).await;
        let ended = Instant::now();
        let at = self.since_start(started);
        // The write has completed: later reads must see it.
        if let Answer::Body {
            version: Some(v), ..
        } = answer
        {
            if v <= self.origin.version(id) {
                self.ledger.completed(id, v, Writer::Layer(layer));
            }
        }
        let mut report = lock(&self.report);
        let report = &mut *report;
        let tally = &mut report.phases[self.phase_of(started).index()];
        tally.requests += 1;
        tally.writes += 1;
        tally.write_micros.push(micros(ended - started));
        match answer {
            Answer::TimedOut => {
                tally.failures += 1;
                sample(
                    &mut report.failure_samples,
                    format!("{at:.1?}: {method} {path} via layer {layer}: no answer within {REQUEST_TIMEOUT:?}"),
                );
            }
            Answer::Status(status, body) => {
                tally.failures += 1;
                sample(
                    &mut report.failure_samples,
                    format!("{at:.1?}: {method} {path} via layer {layer}: {status} {body:?}"),
                );
            }
            Answer::Body {
                version: Some(v), ..
            } if v <= self.origin.version(id) => {}
            Answer::Body {
                version,
                cache_status,
            } => {
                tally.wrong += 1;
                sample(
                    &mut report.wrong_samples,
                    format!(
                        "{at:.1?}: {method} {path} via layer {layer}: {version:?} [{cache_status}]"
                    ),
                );
            }
        }
    }

    /// An application-side change: bump versions in the origin, then tell
    /// the cache through an `Invalidator`, retrying until it succeeds.
    async fn app_invalidate(&self, rng: &mut fastrand::Rng) {
        let layer = rng.usize(0..LAYERS);
        let invalidator = self.layers[layer].invalidator();
        let (change, target, ids): (Change, String, Vec<usize>) = match rng.u32(0..3) {
            0 => {
                let c = rng.usize(0..COLLECTIONS.len());
                let range = self.origin.collection(c);
                let ids = (0..rng.usize(1..=3))
                    .map(|_| rng.usize(range.clone()))
                    .collect();
                (Change::Collection, COLLECTIONS[c].0.to_owned(), ids)
            }
            1 => {
                let id = self.pick_path(rng);
                (Change::Item, self.origin.paths[id].clone(), vec![id])
            }
            _ => {
                let group = rng.usize(0..CATALOG_GROUPS);
                let tag = catalog_tag(group);
                let ids = (0..self.origin.paths.len())
                    .filter(|&id| self.origin.tags[id].as_deref() == Some(tag.as_str()))
                    .collect();
                (Change::Tag, tag, ids)
            }
        };
        let started = Instant::now();
        let mut bumped: Vec<(usize, u64)> = ids.iter().map(|&id| (id, 0)).collect();
        for (id, version) in &mut bumped {
            *version = self.origin.bump(*id);
        }
        let give_up = Instant::now() + INVALIDATE_RETRY_FOR;
        let mut retries = 0;
        let outcome = loop {
            let result = if change == Change::Tag {
                invalidator.invalidate_tag(&target).await
            } else {
                invalidator.invalidate_prefix(&target).await
            };
            match result {
                Ok(_) => break Ok(()),
                Err(err) if Instant::now() >= give_up => break Err(err),
                Err(_) => {
                    retries += 1;
                    tokio::time::sleep(INVALIDATE_RETRY_EVERY).await;
                }
            }
        };
        if outcome.is_ok() {
            for &(id, version) in &bumped {
                self.ledger
                    .completed(id, version, Writer::Invalidator(layer, change));
            }
        }
        let mut report = lock(&self.report);
        let report = &mut *report;
        let tally = &mut report.phases[self.phase_of(started).index()];
        tally.app_invalidations += 1;
        tally.app_retries += retries;
        if let Err(err) = outcome {
            tally.failures += 1;
            sample(
                &mut report.failure_samples,
                format!(
                    "{:.1?}: {}({target:?}): still failing after {INVALIDATE_RETRY_FOR:?}: {err}",
                    self.since_start(started),
                    Writer::Invalidator(layer, change).describe()
                ),
            );
        }
    }
}

/// Whether tower-fence's member of `Cache-Status` has `param`.
fn has_param(cache_status: &str, param: &str) -> bool {
    cache_status
        .split(',')
        .filter(|member| member.trim_start().starts_with("tower-fence"))
        .any(|member| member.split(';').skip(1).any(|p| p.trim() == param))
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn sample(samples: &mut Vec<String>, line: String) {
    if samples.len() < SAMPLES {
        samples.push(line);
    }
}

async fn worker(soak: Arc<Soak>, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while soak.start.elapsed() < soak.duration {
        let roll = rng.u32(0..100);
        if roll < READ_PERCENT {
            soak.read(&mut rng).await;
        } else if roll < READ_PERCENT + WRITE_PERCENT {
            soak.write(&mut rng).await;
        } else {
            soak.app_invalidate(&mut rng).await;
        }
        let pause = rng.u64(0..=MAX_PAUSE_MS);
        if pause > 0 {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// The faults

/// Sleeps until `offset` after the start.
async fn sleep_until(start: Instant, offset: Duration) {
    tokio::time::sleep_until((start + offset).into()).await;
}

async fn run_faults(soak: &Soak, server: Option<&mut RedisServer>) -> Result<(), BoxError> {
    let Some(server) = server else {
        return Ok(());
    };
    let third = soak.duration / 3;
    let down = MAX_DOWN.min(soak.duration / 20);
    let frozen = MAX_FREEZE.min(soak.duration / 15);

    sleep_until(soak.start, third + third / 4).await;
    lock(&soak.report).restart.began = Some(soak.start.elapsed());
    server.kill().await?;
    println!(
        "{:>6.1?}  redis-server killed (kill -9); down for {down:.1?}",
        soak.start.elapsed()
    );
    tokio::time::sleep(down).await;
    server.restart().await?;
    let back = soak.start.elapsed();
    lock(&soak.report).restart.ended = Some(back);
    println!("{back:>6.1?}  redis-server answering again on the same port (empty)");

    sleep_until(soak.start, third * 2 + third / 4).await;
    server.pause().await?;
    lock(&soak.report).freeze.began = Some(soak.start.elapsed());
    println!(
        "{:>6.1?}  redis-server frozen (SIGSTOP) for {frozen:.1?}",
        soak.start.elapsed()
    );
    tokio::time::sleep(frozen).await;
    server.resume().await?;
    let back = soak.start.elapsed();
    lock(&soak.report).freeze.ended = Some(back);
    println!("{back:>6.1?}  redis-server continued (SIGCONT)");
    Ok(())
}

// ---------------------------------------------------------------------------
// Output

fn percentile_ms(micros: &mut [u32], p: f64) -> String {
    if micros.is_empty() {
        return "-".into();
    }
    micros.sort_unstable();
    let rank = ((p * micros.len() as f64).ceil() as usize).clamp(1, micros.len());
    format!("{:.1}", f64::from(micros[rank - 1]) / 1000.0)
}

fn print_table(report: &mut Report, duration: Duration) {
    let third = duration / 3;
    let mut total = Tally::default();
    let mut rows = Vec::new();
    for phase in PHASES {
        let tally = &mut report.phases[phase.index()];
        total.add(tally);
        let from = third * phase.index() as u32;
        let to = if phase == Phase::Freeze {
            duration
        } else {
            from + third
        };
        rows.push(row(
            phase.name(),
            &format!("{:.0}-{:.0} s", from.as_secs_f64(), to.as_secs_f64()),
            tally,
        ));
    }
    rows.push(row("total", "", &mut total));
    println!(
        "{:<8} {:>9} {:>9} {:>8} {:>6} {:>6} {:>8} {:>6} {:>7} {:>10} {:>12} {:>14}",
        "phase",
        "window",
        "requests",
        "failures",
        "wrong",
        "stale",
        "hits",
        "hit %",
        "bypass",
        "GET p99 ms",
        "write p99 ms",
        "app inv (retr)"
    );
    for line in rows {
        println!("{line}");
    }
}

fn row(name: &str, window: &str, tally: &mut Tally) -> String {
    let app = format!("{} ({})", tally.app_invalidations, tally.app_retries);
    let hit_rate = if tally.gets == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}", 100.0 * tally.hits as f64 / tally.gets as f64)
    };
    format!(
        "{:<8} {:>9} {:>9} {:>8} {:>6} {:>6} {:>8} {:>6} {:>7} {:>10} {:>12} {:>14}",
        name,
        window,
        tally.requests,
        tally.failures,
        tally.wrong,
        tally.stale,
        tally.hits,
        hit_rate,
        tally.bypasses,
        percentile_ms(&mut tally.get_micros, 0.99),
        percentile_ms(&mut tally.write_micros, 0.99),
        app,
    )
}

fn describe_fault(name: &str, fault: &Fault) -> String {
    let mut line = format!("{name}: ");
    match (fault.began, fault.ended) {
        (Some(began), Some(ended)) => {
            let _ = write!(line, "Redis gone at {began:.1?}, back at {ended:.1?}");
        }
        (Some(began), None) => {
            let _ = write!(line, "began at {began:.1?}, Redis never came back");
        }
        _ => {
            line.push_str("did not happen");
            return line;
        }
    }
    match fault.first_hit_after {
        Some(after) => {
            let _ = write!(line, "; first hit {after:.1?} after Redis was back");
        }
        None if fault.ended.is_some() => line.push_str("; no hit after Redis was back"),
        None => {}
    }
    line
}

fn print_stats(layers: &[FenceLayer]) {
    println!(
        "{:<6} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9} {:>10} {:>8} {:>8} {:>6}",
        "layer",
        "hits",
        "misses",
        "stores",
        "collapsed",
        "store err",
        "fenced out",
        "inval.",
        "inv err",
        "refresh",
        "dead"
    );
    for (i, layer) in layers.iter().enumerate() {
        let s: Stats = layer.stats();
        println!(
            "{:<6} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9} {:>10} {:>8} {:>8} {:>6}",
            i,
            s.hits,
            s.misses,
            s.stores,
            s.collapsed,
            s.store_errors,
            s.fenced_out,
            s.invalidations,
            s.invalidation_errors,
            s.refreshes,
            s.invalidations_dead
        );
    }
}

/// The stale reads by what they missed, per phase.
fn print_stale(causes: &[StaleCause]) {
    if causes.iter().all(|c| c.per_phase.iter().all(|&n| n == 0)) {
        return;
    }
    println!(
        "\nstale-after-write reads by what they missed:\n{:<38} {:>6} {:>8} {:>7} {:>6} {:>6} {:>12}",
        "missed", "warm", "restart", "freeze", "total", "hits", "longest lag"
    );
    for (name, cause) in CAUSES.iter().zip(causes) {
        let total: u64 = cause.per_phase.iter().sum();
        if total == 0 {
            continue;
        }
        println!(
            "{:<38} {:>6} {:>8} {:>7} {:>6} {:>6} {:>12}",
            name,
            cause.per_phase[0],
            cause.per_phase[1],
            cause.per_phase[2],
            total,
            cause.hits,
            format!("{:.1?}", cause.worst_lag)
        );
    }
}

fn print_samples(title: &str, samples: &[String]) {
    if samples.is_empty() {
        return;
    }
    println!("\nfirst {title}:");
    for line in samples {
        println!("  {line}");
    }
}

// ---------------------------------------------------------------------------
// Setup

async fn pool(url: &str) -> Result<bb8::Pool<RedisConnectionManager>, BoxError> {
    let manager = RedisConnectionManager::new(url)?;
    let pool = bb8::Pool::builder()
        .max_size(POOL_SIZE)
        .connection_timeout(POOL_CONNECTION_TIMEOUT)
        .build(manager)
        .await?;
    // One checkout, so a wrong URL fails here and not as a quiet fail-open.
    drop(
        pool.get()
            .await
            .map_err(|e| format!("connect to {url}: {e}"))?,
    );
    Ok(pool)
}

async fn build_layers(url: &str, namespace: &str) -> Result<Vec<FenceLayer>, BoxError> {
    let mut layers = Vec::with_capacity(LAYERS);
    for _ in 0..LAYERS {
        let layer = FenceLayer::builder()
            .redis(pool(url).await?)
            .namespace(namespace)
            .store_timeout(STORE_TIMEOUT)
            .invalidation_timeout(INVALIDATION_TIMEOUT)
            .wait_timeout(WAIT_TIMEOUT)
            .lease_ttl(LEASE_TTL)
            .build()?;
        layers.push(layer);
    }
    Ok(layers)
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let mut server = match &args.redis {
        Some(_) => None,
        None => Some(RedisServer::start().await?),
    };
    let url = match (&args.redis, &server) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => server.url(),
        (None, None) => return Err("no Redis".into()),
    };
    let run_id = format!("{:x}", args.seed & 0xffff_ffff);
    let namespace = format!("soak:{run_id}:");
    let layers = build_layers(&url, &namespace).await?;
    let origin = Arc::new(Origin::new());
    let services = layers
        .iter()
        .map(|layer| layer.layer(OriginService(origin.clone())))
        .collect();

    println!(
        "soak: {:?} of traffic, {} workers, {LAYERS} layers (own bb8 pools) on one Redis ({}), {} paths, seed {}",
        args.duration,
        args.workers,
        match &server {
            Some(_) => format!("private redis-server at {url}"),
            None => url.clone(),
        },
        origin.paths.len(),
        args.seed
    );
    println!(
        "mix: {READ_PERCENT}% GET, {WRITE_PERCENT}% PUT/POST/DELETE, {}% Invalidator; \
         store_timeout {STORE_TIMEOUT:?}, invalidation_timeout {INVALIDATION_TIMEOUT:?}, \
         wait_timeout {WAIT_TIMEOUT:?}, lease_ttl {LEASE_TTL:?}, origin {ORIGIN_CACHE_CONTROL}",
        100 - READ_PERCENT - WRITE_PERCENT
    );
    if server.is_none() {
        println!(
            "note: --redis given: this program did not start that server, so it cannot \
             kill or freeze it; the restart and freeze phases run without their fault"
        );
    }

    let soak = Arc::new(Soak {
        origin,
        services,
        layers,
        ledger: Ledger::new(COLLECTIONS.iter().map(|(_, n)| n).sum()),
        start: Instant::now(),
        duration: args.duration,
        report: Mutex::new(Report::default()),
    });
    let mut workers = JoinSet::new();
    for w in 0..args.workers {
        let seed = args
            .seed
            .wrapping_add(w as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        workers.spawn(worker(soak.clone(), seed));
    }
    let faults = run_faults(&soak, server.as_mut()).await;
    while let Some(joined) = workers.join_next().await {
        if let Err(err) = joined {
            return Err(format!("a worker failed: {err}").into());
        }
    }
    faults?;
    let elapsed = soak.start.elapsed();

    if args.redis.is_some() {
        // Remove what this run stored in someone else's Redis (its tag sets
        // expire with their entries).
        if let Err(err) = soak.layers[0].invalidator().invalidate_prefix("/").await {
            eprintln!("soak: could not remove this run's keys ({namespace}*): {err}");
        }
    }

    let mut report = std::mem::take(&mut *lock(&soak.report));
    println!("\nall workers done after {elapsed:.1?}\n");
    print_table(&mut report, args.duration);
    println!();
    if server.is_some() {
        println!(
            "{}",
            describe_fault("restart (kill -9, start again)", &report.restart)
        );
        println!(
            "{}",
            describe_fault("freeze (SIGSTOP, SIGCONT)", &report.freeze)
        );
    } else {
        println!("restart and freeze: skipped (--redis)");
    }
    print_stale(&report.stale);
    println!();
    print_stats(&soak.layers);
    print_samples("failures", &report.failure_samples);
    print_samples("wrong answers", &report.wrong_samples);
    for (name, cause) in CAUSES.iter().zip(&report.stale) {
        let mut samples = cause.samples.clone();
        if let Some(worst) = cause.worst.as_ref().filter(|w| !samples.contains(w)) {
            samples.push(format!("longest lag: {worst}"));
        }
        print_samples(
            &format!("stale-after-write reads that missed a {name}"),
            &samples,
        );
    }

    let failures: u64 = report.phases.iter().map(|t| t.failures).sum();
    let wrong: u64 = report.phases.iter().map(|t| t.wrong).sum();
    let stale: u64 = report.phases.iter().map(|t| t.stale).sum();
    let pass = failures == 0 && wrong == 0 && stale == 0;
    println!(
        "\ntargets: failures 0, wrong 0, stale-after-write 0; got {failures}, {wrong}, {stale}: {}",
        if pass { "PASS" } else { "FAIL" }
    );
    Ok(pass)
}

#[tokio::main]
async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(Invocation::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Run(args)) => args,
        Err(reason) => {
            eprintln!("soak: {reason}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("soak: {err}");
            ExitCode::from(2)
        }
    }
}
