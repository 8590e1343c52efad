//! Run with: cargo run --release --example invalidation_bench -- [--redis redis://127.0.0.1:PORT] [--keys 1000000] [--prefix-keys 10000]
//!
//! Measures prefix invalidation in a Redis that holds N keys (`--keys`,
//! default 1,000,000), M of which (`--prefix-keys`, default 10,000) lie
//! under the prefix `/bench/hot`; the other N − M lie under `/bench/cold`.
//! Three methods each delete the same M keys, each from a freshly loaded
//! keyspace:
//!
//! 1. **`KEYS` + `UNLINK`**, the baseline the library never uses: `KEYS` with
//!    the prefix's glob, then `UNLINK` in batches of 1,000.
//! 2. **tower-fence `Scan`**: `invalidator().invalidate_prefix("/bench/hot")`
//!    on a layer built with `.redis(pool)` (default namespace `tf:`), which
//!    walks the keyspace with `SCAN MATCH` (twice: leases, then entries).
//! 3. **tower-fence `Index`**: the same with
//!    `.prefix_strategy(PrefixStrategy::Index)`, which reads the prefix's
//!    index set with `SSCAN`.
//!
//! While each invalidation runs, a separate client on its own connection
//! (its own OS thread, blocking I/O, `TCP_NODELAY`) sends `GET` of an
//! unrelated key in a tight loop and records each `GET`'s latency. The loop
//! starts 100 ms before the invalidation (the baseline) and stops when it
//! returns. The table shows, per method: keys deleted, the time the
//! invalidation took, and the worst and p99 latency of the `GET`s that
//! overlapped it, with the baseline's worst GET and, on the private server,
//! the longest single command Redis ran meanwhile (`SLOWLOG`): what a `GET`
//! waits for at most on Redis's side. A last line gives the noise floor:
//! the same client for as long as the slowest tower-fence invalidation took,
//! with nothing else running. On a small or busy machine the worst `GET`
//! is often the scheduler's, not Redis's; compare it with that line.
//!
//! The keys are the layer's own: `FenceLayer::cache_key` of
//! `GET /bench/hot/{i}` and `GET /bench/cold/{i}` (`tf:/bench/hot/7#{…}`),
//! written with pipelined `SET … PX` (100-byte values) in batches of 10,000.
//! For the `Index` method each key also joins the index sets a fill through
//! the layer would have added it to (its own path's and every ancestor's:
//! `tf:idx:/bench/hot/{i}`, `tf:idx:/bench/hot`, `tf:idx:/bench`,
//! `tf:idx:/`), with `SADD`s in the same pipelines. That mirrors what fills
//! write; filling 1,000,000 entries through the layer itself would take too
//! long. (Fills also give the sets a TTL; these sets have none.)
//!
//! After each method it checks that exactly the M hot keys are gone and
//! all N − M cold ones remain (`EXISTS` over every key, and `DBSIZE`
//! arithmetic); a method that fails the check gets an error row instead of
//! figures.
//!
//! Without `--redis` it starts a private `redis-server` (from `PATH`, or
//! `REDIS_SERVER_BIN`) on a free loopback port, with persistence off,
//! `FLUSHALL`s it between methods and kills it at the end. With `--redis`
//! the selected database must be empty; the benchmark then deletes the keys
//! it wrote by name and never flushes anything. The example needs the
//! `redis` feature (on by default).

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8_redis::redis::aio::MultiplexedConnection;
use bb8_redis::redis::io::tcp::TcpSettings;
use bb8_redis::redis::{self, AsyncConnectionConfig, IntoConnectionInfo as _};
use bb8_redis::{bb8, RedisConnectionManager};
use http::Request;
use tower_fence::invalidate::PrefixStrategy;
use tower_fence::{FenceLayer, DEFAULT_NAMESPACE};

type BoxError = Box<dyn Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

const USAGE: &str = "\
usage: invalidation_bench [--redis URL] [--keys N] [--prefix-keys M]

  --redis URL        use this Redis (its selected database must be empty)
                     instead of starting a private redis-server
  --keys N           keys in Redis (default 1000000)
  --prefix-keys M    of which under the invalidated prefix (default 10000)";

const DEFAULT_KEYS: usize = 1_000_000;
const DEFAULT_PREFIX_KEYS: usize = 10_000;
/// The prefix that is invalidated.
const HOT_PREFIX: &str = "/bench/hot";
/// Where the keys that must survive live.
const COLD_PREFIX: &str = "/bench/cold";
/// The key the concurrent client reads: outside the layer's namespace.
const PROBE_KEY: &str = "bench:probe";
/// Size of each stored value, about that of a small encoded entry.
const VALUE_BYTES: usize = 100;
/// Keys per loading pipeline.
const LOAD_BATCH: usize = 10_000;
/// Keys per `UNLINK` of the baseline (and of the clean-up by name).
const UNLINK_BATCH: usize = 1_000;
/// Keys per `EXISTS` while verifying.
const EXISTS_BATCH: usize = 1_000;
/// TTL of the stored entries; long enough that none expires during a run.
const ENTRY_TTL_MS: u64 = 3_600_000;
/// How long the concurrent client runs before the invalidation starts.
const BASELINE: Duration = Duration::from_millis(100);
/// Pause after loading, so the load's own work settles before measuring.
const SETTLE: Duration = Duration::from_millis(500);
/// `SLOWLOG` threshold on the private server, in µs.
const SLOWLOG_THRESHOLD_US: u64 = 100;
/// `SLOWLOG` length on the private server.
const SLOWLOG_MAX_LEN: u64 = 100_000;
/// Target: worst concurrent `GET` during a tower-fence invalidation.
const WORST_GET_TARGET_MS: f64 = 5.0;
/// Target: time of an `Index` invalidation of 10,000 entries.
const INDEX_TIME_TARGET_MS: f64 = 100.0;
/// The entry count the `Index` time target is stated for.
const INDEX_TIME_TARGET_ENTRIES: usize = 10_000;
/// How many times a private server that dies at once (a port race) is
/// started again.
const SPAWN_ATTEMPTS: usize = 5;
/// How long a private server gets to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

const MISSING_SERVER_HINT: &str = "not found: without --redis this benchmark starts its own \
Redis. Install it (`sudo apt-get install redis-server` on Debian/Ubuntu, `brew install redis` \
on macOS), set REDIS_SERVER_BIN to its path, or pass --redis redis://127.0.0.1:PORT";

#[derive(Debug)]
struct Args {
    redis: Option<String>,
    keys: usize,
    prefix_keys: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        redis: None,
        keys: DEFAULT_KEYS,
        prefix_keys: DEFAULT_PREFIX_KEYS,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--redis" => args.redis = Some(value()?),
            "--keys" => args.keys = parse_count(&flag, &value()?)?,
            "--prefix-keys" => args.prefix_keys = parse_count(&flag, &value()?)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    if args.prefix_keys == 0 || args.prefix_keys > args.keys {
        return Err(format!(
            "--prefix-keys must be between 1 and --keys ({}), got {}",
            args.keys, args.prefix_keys
        ));
    }
    Ok(args)
}

fn parse_count(flag: &str, value: &str) -> Result<usize, String> {
    value
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{flag}: not a count: {value:?}"))
}

// ---------------------------------------------------------------------------
// A private redis-server
// ---------------------------------------------------------------------------

/// A `redis-server` this program started; killed when dropped.
#[derive(Debug)]
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> Res<Self> {
        let bin = std::env::var_os("REDIS_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let mut last_exit = String::new();
        for _ in 0..SPAWN_ATTEMPTS {
            let port = free_port()?;
            let spawned = Command::new(&bin)
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!("{} {MISSING_SERVER_HINT}", bin.display()).into());
                }
                Err(err) => return Err(format!("cannot start {}: {err}", bin.display()).into()),
            };
            let mut server = RedisServer { child, port };
            match server.wait_ready()? {
                None => return Ok(server),
                Some(exit) => last_exit = exit,
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

    /// Waits until this child answers on its port; `Some(status)` when it
    /// exited first (usually: the port was taken meanwhile).
    fn wait_ready(&mut self) -> Res<Option<String>> {
        let client = redis::Client::open(self.url())?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status.to_string()));
            }
            // A server that won a port race is not ours: compare the pid.
            let pid = client.get_connection().ok().and_then(|mut conn| {
                redis::cmd("INFO")
                    .arg("server")
                    .query::<String>(&mut conn)
                    .ok()
                    .and_then(|info| info_field(&info, "process_id")?.parse::<u32>().ok())
            });
            if pid == Some(self.child.id()) {
                return Ok(None);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on port {} did not answer within {READY_TIMEOUT:?}",
                    self.port
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

// ---------------------------------------------------------------------------
// The keyspace
// ---------------------------------------------------------------------------

/// The keys the benchmark writes, as the layer derives them.
#[derive(Debug)]
struct Keyspace {
    /// Paths and keys under the invalidated prefix.
    hot: Vec<(String, String)>,
    /// Paths and keys elsewhere.
    cold: Vec<(String, String)>,
}

impl Keyspace {
    fn derive(layer: &FenceLayer, hot: usize, cold: usize) -> Res<Self> {
        let entries = |prefix: &str, n: usize| -> Res<Vec<(String, String)>> {
            (0..n)
                .map(|i| {
                    let path = format!("{prefix}/{i}");
                    let key = layer.cache_key(&Request::get(path.as_str()).body(())?);
                    Ok((path, key))
                })
                .collect()
        };
        let keyspace = Keyspace {
            hot: entries(HOT_PREFIX, hot)?,
            cold: entries(COLD_PREFIX, cold)?,
        };
        // The patterns must select exactly these keys: check their shape.
        for (path, key) in keyspace.hot.iter().chain(&keyspace.cold) {
            let readable = format!("{DEFAULT_NAMESPACE}{path}#{{");
            if !key.starts_with(&readable) || !key.ends_with('}') {
                return Err(format!("unexpected key shape for {path}: {key}").into());
            }
        }
        Ok(keyspace)
    }

    fn len(&self) -> usize {
        self.hot.len() + self.cold.len()
    }
}

/// The index sets a fill of an entry at `path` adds its key to with the
/// `Index` strategy: the path's own set and each ancestor's, up to `/`.
/// (The benchmark's paths hold no character the layer escapes.)
fn index_sets(path: &str) -> Vec<String> {
    let mut sets = Vec::new();
    let mut current = path.trim_end_matches('/');
    loop {
        if current.is_empty() {
            current = "/";
        }
        sets.push(format!("{DEFAULT_NAMESPACE}idx:{current}"));
        if current == "/" {
            return sets;
        }
        current = &current[..current.rfind('/').unwrap_or(0)];
    }
}

/// Writes the keyspace (and, when `indexed`, the index sets) with pipelined
/// `SET … PX` and `SADD`, then the probe key.
async fn load(conn: &mut MultiplexedConnection, keyspace: &Keyspace, indexed: bool) -> Res<()> {
    let value = vec![b'x'; VALUE_BYTES];
    for entries in [&keyspace.hot, &keyspace.cold] {
        for batch in entries.chunks(LOAD_BATCH) {
            let mut pipe = redis::pipe();
            // Ancestor set name -> members of this batch, in first-seen
            // order: one `SADD` each per batch instead of one per key.
            let mut ancestors: Vec<(String, Vec<&str>)> = Vec::new();
            for (path, key) in batch {
                pipe.cmd("SET")
                    .arg(key)
                    .arg(&value)
                    .arg("PX")
                    .arg(ENTRY_TTL_MS)
                    .ignore();
                if !indexed {
                    continue;
                }
                let mut sets = index_sets(path).into_iter();
                if let Some(own) = sets.next() {
                    pipe.cmd("SADD").arg(own).arg(key).ignore();
                }
                for set in sets {
                    match ancestors.iter_mut().find(|(name, _)| *name == set) {
                        Some((_, members)) => members.push(key),
                        None => ancestors.push((set, vec![key])),
                    }
                }
            }
            for (set, members) in &ancestors {
                pipe.cmd("SADD").arg(set).arg(members).ignore();
            }
            pipe.exec_async(conn).await?;
        }
    }
    redis::cmd("SET")
        .arg(PROBE_KEY)
        .arg(&value)
        .exec_async(conn)
        .await?;
    Ok(())
}

/// Removes everything the benchmark wrote: `FLUSHALL` on the private
/// server; by name on someone else's.
async fn clear(
    conn: &mut MultiplexedConnection,
    keyspace: &Keyspace,
    private: bool,
    indexed: bool,
) -> Res<()> {
    if private {
        redis::cmd("FLUSHALL").arg("SYNC").exec_async(conn).await?;
        return Ok(());
    }
    let mut names: Vec<&str> = Vec::with_capacity(keyspace.len() + 1);
    names.extend(
        keyspace
            .hot
            .iter()
            .chain(&keyspace.cold)
            .map(|(_, k)| k.as_str()),
    );
    names.push(PROBE_KEY);
    let mut sets: Vec<String> = Vec::new();
    if indexed {
        let mut shared = std::collections::BTreeSet::new();
        for (path, _) in keyspace.hot.iter().chain(&keyspace.cold) {
            let mut path_sets = index_sets(path).into_iter();
            sets.extend(path_sets.next());
            shared.extend(path_sets);
        }
        sets.extend(shared);
    }
    names.extend(sets.iter().map(String::as_str));
    for chunk in names.chunks(UNLINK_BATCH * 10) {
        let mut pipe = redis::pipe();
        for batch in chunk.chunks(UNLINK_BATCH) {
            pipe.cmd("UNLINK").arg(batch).ignore();
        }
        pipe.exec_async(conn).await?;
    }
    Ok(())
}

/// How many of `entries` exist.
async fn count_existing(
    conn: &mut MultiplexedConnection,
    entries: &[(String, String)],
) -> Res<u64> {
    let mut total = 0;
    for chunk in entries.chunks(EXISTS_BATCH * 50) {
        let mut pipe = redis::pipe();
        for batch in chunk.chunks(EXISTS_BATCH) {
            let keys: Vec<&str> = batch.iter().map(|(_, k)| k.as_str()).collect();
            pipe.cmd("EXISTS").arg(keys);
        }
        let counts: Vec<u64> = pipe.query_async(conn).await?;
        total += counts.iter().sum::<u64>();
    }
    Ok(total)
}

async fn dbsize(conn: &mut MultiplexedConnection) -> Res<u64> {
    Ok(redis::cmd("DBSIZE").query_async(conn).await?)
}

// ---------------------------------------------------------------------------
// The methods
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    KeysUnlink,
    Scan,
    Index,
}

impl Method {
    const ALL: [Method; 3] = [Method::KeysUnlink, Method::Scan, Method::Index];

    fn label(self) -> &'static str {
        match self {
            Method::KeysUnlink => "KEYS + UNLINK (baseline)",
            Method::Scan => "tower-fence Scan",
            Method::Index => "tower-fence Index",
        }
    }

    fn indexed(self) -> bool {
        self == Method::Index
    }
}

/// The baseline: `KEYS glob`, then `UNLINK` in batches.
async fn keys_unlink(conn: &mut MultiplexedConnection) -> Res<u64> {
    // The glob tower-fence's Scan strategy matches with (see `key.rs`).
    let glob = format!("{DEFAULT_NAMESPACE}{HOT_PREFIX}[#/]*");
    let keys: Vec<String> = redis::cmd("KEYS").arg(&glob).query_async(conn).await?;
    let mut deleted = 0;
    for batch in keys.chunks(UNLINK_BATCH) {
        let removed: u64 = redis::cmd("UNLINK").arg(batch).query_async(conn).await?;
        deleted += removed;
    }
    Ok(deleted)
}

/// One `GET` of the concurrent client.
#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Instant,
    latency: Duration,
}

/// Sends `GET PROBE_KEY` in a tight loop on its own connection until `stop`,
/// recording each one. Signals `ready` after its first `GET`.
fn probe(
    url: String,
    stop: Arc<AtomicBool>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<Vec<Sample>, String> {
    let info = url
        .as_str()
        .into_connection_info()
        .map_err(|e| e.to_string())?
        .set_tcp_settings(TcpSettings::default().set_nodelay(true));
    let client = redis::Client::open(info).map_err(|e| e.to_string())?;
    let mut conn = client.get_connection().map_err(|e| e.to_string())?;
    let mut get = redis::cmd("GET");
    get.arg(PROBE_KEY);
    let first: Option<Vec<u8>> = get.query(&mut conn).map_err(|e| e.to_string())?;
    if first.is_none() {
        return Err(format!("probe key {PROBE_KEY} is missing"));
    }
    let _ = ready.send(());
    let mut samples = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let value: Option<Vec<u8>> = get.query(&mut conn).map_err(|e| e.to_string())?;
        let latency = start.elapsed();
        if value.is_none() {
            return Err(format!("probe key {PROBE_KEY} vanished"));
        }
        samples.push(Sample { start, latency });
    }
    Ok(samples)
}

/// The concurrent client, running on its own thread.
#[derive(Debug)]
struct Prober {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<Sample>, String>>,
}

impl Prober {
    /// Starts the client; returns once its first `GET` was answered.
    async fn start(url: &str) -> Res<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let thread = {
            let (url, stop) = (url.to_owned(), stop.clone());
            std::thread::spawn(move || probe(url, stop, ready_tx))
        };
        if ready_rx.await.is_err() {
            let err = thread
                .join()
                .map_err(|_| "the concurrent client panicked")?
                .err()
                .unwrap_or_default();
            return Err(format!("the concurrent client did not start: {err}").into());
        }
        Ok(Prober { stop, thread })
    }

    /// Stops the client; returns every `GET` it made.
    async fn finish(self) -> Res<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        Ok(tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| "the concurrent client panicked")?
            .map_err(|e| format!("the concurrent client failed: {e}"))?)
    }
}

/// The noise floor: the concurrent client's `GET`s over `window` while
/// nothing else runs. Returns (GETs, worst ms, p99 ms).
async fn idle_floor(url: &str, window: Duration) -> Res<(usize, f64, f64)> {
    let prober = Prober::start(url).await?;
    tokio::time::sleep(window).await;
    let mut latencies: Vec<Duration> = prober.finish().await?.iter().map(|s| s.latency).collect();
    latencies.sort_unstable();
    Ok((
        latencies.len(),
        ms(latencies.last().copied().unwrap_or_default()),
        ms(percentile(&latencies, 0.99)),
    ))
}

/// What one method measured.
#[derive(Debug)]
struct Row {
    method: Method,
    outcome: Result<Measured, String>,
}

#[derive(Debug)]
struct Measured {
    deleted: u64,
    elapsed: Duration,
    /// `GET`s that overlapped the invalidation.
    gets: usize,
    worst_ms: f64,
    p99_ms: f64,
    baseline_worst_ms: f64,
    /// The longest command Redis ran meanwhile (from `SLOWLOG`, private
    /// server only), in ms, and its name.
    longest: Option<(f64, String)>,
}

/// The layers under test.
#[derive(Debug)]
struct Layers {
    scan: FenceLayer,
    index: FenceLayer,
}

/// Loads a fresh keyspace, runs `method` with the concurrent client going,
/// and checks what it deleted.
async fn run_method(
    method: Method,
    url: &str,
    conn: &mut MultiplexedConnection,
    layers: &Layers,
    keyspace: &Keyspace,
    private: bool,
) -> Res<Row> {
    clear(conn, keyspace, private, true).await?;
    let started = Instant::now();
    load(conn, keyspace, method.indexed()).await?;
    tokio::time::sleep(SETTLE).await;
    let before = dbsize(conn).await?;
    println!(
        "{:<26} loaded in {:.1} s, DBSIZE {before}",
        method.label(),
        started.elapsed().as_secs_f64() - SETTLE.as_secs_f64()
    );

    let prober = Prober::start(url).await?;
    tokio::time::sleep(BASELINE).await;

    if private {
        redis::cmd("SLOWLOG").arg("RESET").exec_async(conn).await?;
    }
    let t0 = Instant::now();
    let result = match method {
        Method::KeysUnlink => keys_unlink(conn).await,
        Method::Scan => layers
            .scan
            .invalidator()
            .invalidate_prefix(HOT_PREFIX)
            .await
            .map_err(BoxError::from),
        Method::Index => layers
            .index
            .invalidator()
            .invalidate_prefix(HOT_PREFIX)
            .await
            .map_err(BoxError::from),
    };
    let t1 = Instant::now();
    let samples = prober.finish().await?;
    let longest = if private {
        longest_command(conn).await?
    } else {
        None
    };

    let deleted = match result {
        Ok(deleted) => deleted,
        Err(err) => {
            return Ok(Row {
                method,
                outcome: Err(format!("invalidation failed: {err}")),
            })
        }
    };
    if let Err(problem) = verify(method, conn, keyspace, before, deleted).await? {
        return Ok(Row {
            method,
            outcome: Err(problem),
        });
    }

    let mut during: Vec<Duration> = samples
        .iter()
        .filter(|s| s.start < t1 && s.start + s.latency > t0)
        .map(|s| s.latency)
        .collect();
    let mut baseline: Vec<Duration> = samples
        .iter()
        .filter(|s| s.start + s.latency <= t0)
        .map(|s| s.latency)
        .collect();
    during.sort_unstable();
    baseline.sort_unstable();
    Ok(Row {
        method,
        outcome: Ok(Measured {
            deleted,
            elapsed: t1 - t0,
            gets: during.len(),
            worst_ms: ms(during.last().copied().unwrap_or_default()),
            p99_ms: ms(percentile(&during, 0.99)),
            baseline_worst_ms: ms(baseline.last().copied().unwrap_or_default()),
            longest,
        }),
    })
}

/// The longest command in `SLOWLOG` other than the concurrent client's
/// `GET`s: how long Redis was busy with one command of the invalidation,
/// which is what a `GET` arriving then waits for, whatever the machine's
/// scheduling adds.
async fn longest_command(conn: &mut MultiplexedConnection) -> Res<Option<(f64, String)>> {
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(SLOWLOG_MAX_LEN)
        .query_async(conn)
        .await?;
    let mut longest: Option<(i64, String)> = None;
    for entry in entries {
        // [id, timestamp, microseconds, [command, args...], ...]
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let (Some(redis::Value::Int(micros)), Some(redis::Value::Array(argv))) =
            (fields.get(2), fields.get(3))
        else {
            continue;
        };
        let arg = |i: usize| match argv.get(i) {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).to_uppercase(),
            _ => String::new(),
        };
        let name = arg(0);
        let probe_get = name == "GET" && arg(1) == PROBE_KEY.to_uppercase();
        if probe_get || name == "SLOWLOG" {
            continue;
        }
        if longest.as_ref().is_none_or(|(m, _)| micros > m) {
            longest = Some((*micros, name));
        }
    }
    Ok(longest.map(|(micros, name)| (micros as f64 / 1_000.0, name)))
}

/// `Ok(Err(why))` when the method did not delete exactly the hot keys.
async fn verify(
    method: Method,
    conn: &mut MultiplexedConnection,
    keyspace: &Keyspace,
    before: u64,
    deleted: u64,
) -> Res<Result<(), String>> {
    let m = keyspace.hot.len() as u64;
    let cold = keyspace.cold.len() as u64;
    let hot_left = count_existing(conn, &keyspace.hot).await?;
    let cold_left = count_existing(conn, &keyspace.cold).await?;
    let after = dbsize(conn).await?;
    // The Index strategy removes members from the prefix's set as it
    // unlinks them; Redis drops the set once it is empty.
    let emptied_sets = if method.indexed() {
        let set = format!("{DEFAULT_NAMESPACE}idx:{HOT_PREFIX}");
        let exists: u64 = redis::cmd("EXISTS").arg(&set).query_async(conn).await?;
        if exists != 0 {
            return Ok(Err(format!("index set {set} still exists")));
        }
        1
    } else {
        0
    };
    let expected_after = before.saturating_sub(m + emptied_sets);
    let mut problems = Vec::new();
    if deleted != m {
        problems.push(format!("reported {deleted} deleted, expected {m}"));
    }
    if hot_left != 0 {
        problems.push(format!("{hot_left} of {m} hot keys left"));
    }
    if cold_left != cold {
        problems.push(format!("{cold_left} of {cold} cold keys left"));
    }
    if after != expected_after {
        problems.push(format!(
            "DBSIZE {before} -> {after}, expected {expected_after}"
        ));
    }
    Ok(if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// The `q` quantile of sorted `values` (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

async fn run(args: &Args, url: &str, private: bool) -> Res<()> {
    let client = redis::Client::open(url)?;
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let version = info_field(&info, "redis_version").unwrap_or("unknown");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if private {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("slowlog-log-slower-than")
            .arg(SLOWLOG_THRESHOLD_US)
            .exec_async(&mut conn)
            .await?;
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("slowlog-max-len")
            .arg(SLOWLOG_MAX_LEN)
            .exec_async(&mut conn)
            .await?;
    } else {
        let size = dbsize(&mut conn).await?;
        if size != 0 {
            return Err(format!(
                "{url} holds {size} keys: point --redis at an empty database \
                 (e.g. redis://127.0.0.1:PORT/15); the benchmark loads and deletes keys there"
            )
            .into());
        }
    }

    let pool = bb8::Pool::builder()
        .build(RedisConnectionManager::new(url)?)
        .await?;
    let layers = Layers {
        scan: FenceLayer::builder().redis(pool.clone()).build()?,
        index: FenceLayer::builder()
            .redis(pool)
            .prefix_strategy(PrefixStrategy::Index)
            .build()?,
    };

    let (hot, cold) = (args.prefix_keys, args.keys - args.prefix_keys);
    let started = Instant::now();
    let keyspace = Keyspace::derive(&layers.scan, hot, cold)?;
    let sample = Request::get(format!("{HOT_PREFIX}/0")).body(())?;
    if layers.index.cache_key(&sample) != keyspace.hot[0].1 {
        return Err("the two layers derive different keys".into());
    }
    println!(
        "Redis {version} at {url}{}, {cores} cores",
        if private { " (private)" } else { "" }
    );
    println!(
        "{} keys, {hot} under {HOT_PREFIX} (e.g. {}); keys derived in {:.1} s",
        keyspace.len(),
        keyspace.hot[0].1,
        started.elapsed().as_secs_f64()
    );
    println!();

    let mut rows = Vec::new();
    for method in Method::ALL {
        rows.push(run_method(method, url, &mut conn, &layers, &keyspace, private).await?);
    }
    // The same client with nothing else going on, as long as the longest
    // invalidation took (KEYS aside): how much of a worst GET is the
    // machine rather than Redis.
    let window = rows
        .iter()
        .filter(|r| r.method != Method::KeysUnlink)
        .filter_map(|r| r.outcome.as_ref().ok().map(|m| m.elapsed))
        .max()
        .unwrap_or_default()
        .clamp(Duration::from_secs(1), Duration::from_secs(30));
    let (idle_gets, idle_worst, idle_p99) = idle_floor(url, window).await?;
    clear(&mut conn, &keyspace, private, true).await?;

    println!();
    println!(
        "Redis {version}, {cores} cores, {} keys, {hot} under {HOT_PREFIX}",
        keyspace.len()
    );
    println!();
    println!(
        "{:<26} {:>8} {:>14} {:>8} {:>13} {:>11} {:>15} {:>20}",
        "method",
        "deleted",
        "invalidate ms",
        "GETs",
        "worst GET ms",
        "p99 GET ms",
        "baseline worst",
        "longest cmd ms"
    );
    for row in &rows {
        match &row.outcome {
            Ok(m) => {
                let longest = m
                    .longest
                    .as_ref()
                    .map_or_else(|| "n/a".to_owned(), |(ms, name)| format!("{ms:.2} {name}"));
                println!(
                    "{:<26} {:>8} {:>14.1} {:>8} {:>13.2} {:>11.2} {:>15.2} {:>20}",
                    row.method.label(),
                    m.deleted,
                    ms(m.elapsed),
                    m.gets,
                    m.worst_ms,
                    m.p99_ms,
                    m.baseline_worst_ms,
                    longest
                );
            }
            Err(err) => println!("{:<26} ERROR: {err}", row.method.label()),
        }
    }
    println!();
    println!(
        "GETs: concurrent GETs that overlapped the invalidation; baseline worst: the worst GET \
         in the {} ms before it (ms);\nlongest cmd: the longest command Redis itself ran during \
         the invalidation (SLOWLOG, private server only).",
        BASELINE.as_millis()
    );
    println!(
        "Noise floor: the same client for {:.1} s with no invalidation running: \
         {idle_gets} GETs, worst {idle_worst:.2} ms, p99 {idle_p99:.2} ms.",
        window.as_secs_f64()
    );
    println!();
    println!("targets:");
    for row in &rows {
        if row.method == Method::KeysUnlink {
            continue;
        }
        let label = row.method.label();
        match &row.outcome {
            Ok(m) => {
                println!(
                    "  {label}: worst concurrent GET < {WORST_GET_TARGET_MS} ms: {:.2} ms, {}",
                    m.worst_ms,
                    verdict(m.worst_ms < WORST_GET_TARGET_MS)
                );
                if row.method == Method::Index {
                    let note = if hot == INDEX_TIME_TARGET_ENTRIES {
                        String::new()
                    } else {
                        format!(" (the target is stated for {INDEX_TIME_TARGET_ENTRIES} entries)")
                    };
                    println!(
                        "  {label}: invalidates {hot} entries in < {INDEX_TIME_TARGET_MS} ms: \
                         {:.1} ms, {}{note}",
                        ms(m.elapsed),
                        verdict(ms(m.elapsed) < INDEX_TIME_TARGET_MS)
                    );
                }
            }
            Err(_) => println!("  {label}: not measured (error above), NOT MET"),
        }
    }
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT MET"
    }
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("{err}");
            std::process::exit(2);
        }
    };
    let server = match &args.redis {
        Some(_) => None,
        None => match RedisServer::start() {
            Ok(server) => Some(server),
            Err(err) => {
                eprintln!("error: {err}");
                std::process::exit(1);
            }
        },
    };
    let url = match (&args.redis, &server) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => server.url(),
        (None, None) => unreachable!("a server was started"),
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BoxError::from)
        .and_then(|runtime| {
            let result = runtime.block_on(async {
                tokio::select! {
                    result = run(&args, &url, server.is_some()) => result,
                    _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
                }
            });
            // Do not wait for the layers' background readers.
            runtime.shutdown_background();
            result
        });
    // Kills the private server, if any.
    drop(server);
    if let Err(err) = result {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
