//! Fault tests (issue 10): real traffic through the layer while its store
//! fails: Redis killed and restarted, frozen past every timeout, out of
//! memory, its records overwritten, starved of connections, and a Redis
//! Cluster failing over. Every response is checked against the origin.
//!
//! The origin keeps a version per path `/{group}/{item}`; a `POST` moves on
//! the version of its path, or of every path of a group (`POST /{group}`),
//! and answers the new versions. Each read is sorted into:
//!
//! - **failed**: not a `200` (the origin answers nothing else), an error,
//!   or no answer within [`REQUEST_TIMEOUT`];
//! - **wrong**: a body the origin never served for that path (another
//!   path's, a truncated or garbled one);
//! - **stale**: a version older than one a write had answered before the
//!   read started (DESIGN.md, guarantee 2). A read concurrent with a write
//!   may see either version.
//!
//! Nothing is timed beyond "within a generous bound"; how long the cache
//! took to recover is printed (`cargo test --test faults -- --nocapture`).

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode, Uri};
use axum::routing::{get, post};
use axum::Router;
use bb8_redis::{bb8, redis, RedisConnectionManager};
use bytes::Bytes;
use http_body_util::BodyExt;
use support::{raw_command, RedisProcess};
use tokio::task::JoinHandle;
use tower::ServiceExt;
use tower_fence::{FenceLayer, FenceLayerBuilder, StoreError};

/// Longest any one request may take before it counts as hung.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the cache may take to serve hits again after a fault ends.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);
/// Pause of each load worker between two requests: enough load to keep
/// every path busy without starving a shared two-core machine.
const PACE: Duration = Duration::from_millis(2);

// ---------------------------------------------------------------------------
// The origin: a version per path
// ---------------------------------------------------------------------------

/// An origin with a version per path `/{group}/{item}`. `GET` answers
/// `"{path} v{version}"` (plus `padding` bytes), fresh for 60 s and tagged
/// `tag-{group}`; `POST /{group}/{item}` and `POST /{group}` move on the
/// versions of that path or of the group's paths and answer them, one
/// `"{path} v{version}"` per line.
#[derive(Clone)]
struct Origin {
    state: Arc<OriginState>,
}

struct OriginState {
    paths: Mutex<HashMap<String, Versions>>,
    padding: usize,
}

#[derive(Default)]
struct Versions {
    current: u64,
    /// Every version a `GET` answered.
    served: HashSet<u64>,
}

impl Origin {
    fn new(groups: usize, items: usize, padding: usize) -> Self {
        let paths = (0..groups)
            .flat_map(|g| (0..items).map(move |i| (format!("/g{g}/i{i}"), Versions::default())))
            .collect();
        Origin {
            state: Arc::new(OriginState {
                paths: Mutex::new(paths),
                padding,
            }),
        }
    }

    fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.state.paths.lock().unwrap().keys().cloned().collect();
        paths.sort();
        paths
    }

    fn group(&self, group: &str) -> Vec<String> {
        let prefix = format!("/{group}/");
        self.paths()
            .into_iter()
            .filter(|p| p.starts_with(&prefix))
            .collect()
    }

    fn body(&self, path: &str, version: u64) -> String {
        format!("{path} v{version}{}", ".".repeat(self.state.padding))
    }

    /// The version `body` is of, if the origin served it for `path`.
    fn served_version(&self, path: &str, body: &[u8]) -> Option<u64> {
        let body = std::str::from_utf8(body).ok()?;
        let rest = body.strip_prefix(path)?.strip_prefix(" v")?;
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let version: u64 = rest[..digits].parse().ok()?;
        let paths = self.state.paths.lock().unwrap();
        let served = paths.get(path)?.served.contains(&version);
        (served && body == self.body(path, version)).then_some(version)
    }

    /// Moves on the version of `prefix` and of every path under it.
    fn bump(&self, prefix: &str) -> Vec<(String, u64)> {
        let under = format!("{prefix}/");
        let mut paths = self.state.paths.lock().unwrap();
        let mut bumped: Vec<(String, u64)> = paths
            .iter_mut()
            .filter(|(path, _)| *path == prefix || path.starts_with(&under))
            .map(|(path, versions)| {
                versions.current += 1;
                (path.clone(), versions.current)
            })
            .collect();
        bumped.sort();
        bumped
    }

    fn router(&self) -> Router {
        async fn read(State(origin): State<Origin>, uri: Uri) -> http::Response<Body> {
            let path = uri.path().to_owned();
            let version = {
                let mut paths = origin.state.paths.lock().unwrap();
                let Some(versions) = paths.get_mut(&path) else {
                    return http::Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Body::empty())
                        .unwrap();
                };
                versions.served.insert(versions.current);
                versions.current
            };
            let group = path.split('/').nth(1).unwrap_or_default().to_owned();
            http::Response::builder()
                .header("cache-control", "max-age=60")
                .header("surrogate-key", format!("tag-{group}"))
                .body(Body::from(origin.body(&path, version)))
                .unwrap()
        }
        async fn write(State(origin): State<Origin>, uri: Uri) -> String {
            origin
                .bump(uri.path())
                .iter()
                .map(|(path, version)| format!("{path} v{version}\n"))
                .collect()
        }
        Router::new()
            .route("/{group}/{item}", get(read).post(write))
            .route("/{group}", post(write))
            .with_state(self.clone())
    }
}

// ---------------------------------------------------------------------------
// The checker: every answer against the origin
// ---------------------------------------------------------------------------

struct Reply {
    status: StatusCode,
    cache_status: String,
    body: Bytes,
}

impl Reply {
    fn is_hit(&self) -> bool {
        self.cache_status
            .split(';')
            .any(|part| part.trim() == "hit")
    }

    fn preview(&self) -> String {
        let shown = &self.body[..self.body.len().min(40)];
        format!("{:?}", String::from_utf8_lossy(shown))
    }
}

/// Sends one request; an error or no answer within [`REQUEST_TIMEOUT`] is
/// an `Err` describing it.
async fn send(app: &Router, method: Method, path: &str) -> Result<Reply, String> {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .unwrap();
    let exchange = async {
        let response = app
            .clone()
            .oneshot(request)
            .await
            .unwrap_or_else(|never| match never {});
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body error: {e}"))?
            .to_bytes();
        let cache_status = parts
            .headers
            .get_all("cache-status")
            .iter()
            .map(|v| v.to_str().unwrap_or("<not visible ASCII>").to_owned())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Reply {
            status: parts.status,
            cache_status,
            body,
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

/// What the checked requests came to.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    reads: u64,
    writes: u64,
    hits: u64,
    failed: u64,
    wrong: u64,
    stale: u64,
}

/// Sends requests through a layer and checks every answer against the
/// origin, remembering for each path the newest version a write answered.
struct Check {
    origin: Origin,
    /// When the check started: times in messages are counted from here.
    started: Instant,
    /// Per path: the newest version whose write had returned, and when.
    floors: Mutex<HashMap<String, (u64, Duration)>>,
    /// What the test is doing now, named in each problem.
    phase: Mutex<&'static str>,
    counts: Mutex<Counts>,
    hits_by_path: Mutex<HashMap<String, u64>>,
    /// The first problems, for the failure message.
    problems: Mutex<Vec<String>>,
    /// Problems per phase.
    by_phase: Mutex<BTreeMap<&'static str, u64>>,
    /// Stale reads per phase and path.
    stale_paths: Mutex<BTreeMap<(&'static str, String), u64>>,
}

/// Problems kept for the failure message.
const PROBLEMS_SHOWN: usize = 12;

impl Check {
    fn new(origin: Origin) -> Arc<Self> {
        Arc::new(Check {
            origin,
            started: Instant::now(),
            floors: Mutex::new(HashMap::new()),
            phase: Mutex::new("warm-up"),
            counts: Mutex::new(Counts::default()),
            hits_by_path: Mutex::new(HashMap::new()),
            problems: Mutex::new(Vec::new()),
            by_phase: Mutex::new(BTreeMap::new()),
            stale_paths: Mutex::new(BTreeMap::new()),
        })
    }

    /// Time since the check started, for messages.
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Starts a phase of the test, and says so with the time.
    fn set_phase(&self, phase: &'static str) {
        eprintln!("+{:?}: {phase}", self.now());
        *self.phase.lock().unwrap() = phase;
    }

    fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap()
    }

    fn counts(&self) -> Counts {
        *self.counts.lock().unwrap()
    }

    fn hits(&self) -> u64 {
        self.counts().hits
    }

    /// Hits on any of `paths` so far.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))] // cluster test only
    fn hits_on(&self, paths: &[String]) -> u64 {
        let hits = self.hits_by_path.lock().unwrap();
        paths.iter().filter_map(|p| hits.get(p)).sum()
    }

    /// The newest version written to `path` by a write that returned, and
    /// when it returned.
    fn floor(&self, path: &str) -> (u64, Duration) {
        self.floors
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or_default()
    }

    /// A write that moved `versions` on has returned: no read that starts
    /// from now on may see older ones.
    fn raise_floors(&self, versions: &[(String, u64)]) {
        let now = self.now();
        let mut floors = self.floors.lock().unwrap();
        for (path, version) in versions {
            let floor = floors.entry(path.clone()).or_default();
            if *version > floor.0 {
                *floor = (*version, now);
            }
        }
    }

    fn problem(&self, phase: &'static str, count: fn(&mut Counts) -> &mut u64, what: String) {
        *count(&mut self.counts.lock().unwrap()) += 1;
        *self.by_phase.lock().unwrap().entry(phase).or_default() += 1;
        let mut problems = self.problems.lock().unwrap();
        if problems.len() < PROBLEMS_SHOWN {
            problems.push(what);
        }
    }

    /// A checked `GET` of `path`.
    async fn read(&self, app: &Router, path: &str) -> Option<Reply> {
        let (floor, written) = self.floor(path);
        let phase = self.phase();
        let started = self.now();
        self.counts.lock().unwrap().reads += 1;
        let reply = match send(app, Method::GET, path).await {
            Ok(reply) => reply,
            Err(err) => {
                self.problem(
                    phase,
                    |c| &mut c.failed,
                    format!("[{phase}] failed: GET {path}: {err}"),
                );
                return None;
            }
        };
        if reply.status != StatusCode::OK {
            self.problem(
                phase,
                |c| &mut c.failed,
                format!(
                    "[{phase}] failed: GET {path}: {} ({}) {}",
                    reply.status,
                    reply.cache_status,
                    reply.preview()
                ),
            );
            return None;
        }
        match self.origin.served_version(path, &reply.body) {
            None => self.problem(
                phase,
                |c| &mut c.wrong,
                format!(
                    "[{phase}] wrong: GET {path} got {} ({})",
                    reply.preview(),
                    reply.cache_status
                ),
            ),
            Some(version) if version < floor => {
                *self
                    .stale_paths
                    .lock()
                    .unwrap()
                    .entry((phase, path.to_owned()))
                    .or_default() += 1;
                self.problem(
                    phase,
                    |c| &mut c.stale,
                    format!(
                        "[{phase}] stale: GET {path} sent at +{started:?} got v{version} ({}); a \
                     write of v{floor} had returned at +{written:?}",
                        reply.cache_status
                    ),
                )
            }
            Some(_) => {}
        }
        if reply.is_hit() {
            self.counts.lock().unwrap().hits += 1;
            *self
                .hits_by_path
                .lock()
                .unwrap()
                .entry(path.to_owned())
                .or_default() += 1;
        }
        Some(reply)
    }

    /// A checked `POST` of `path` (one path, or a group).
    async fn write(&self, app: &Router, path: &str) {
        let phase = self.phase();
        self.counts.lock().unwrap().writes += 1;
        let reply = match send(app, Method::POST, path).await {
            Ok(reply) => reply,
            Err(err) => {
                self.problem(
                    phase,
                    |c| &mut c.failed,
                    format!("[{phase}] failed: POST {path}: {err}"),
                );
                return;
            }
        };
        if reply.status != StatusCode::OK {
            self.problem(
                phase,
                |c| &mut c.failed,
                format!(
                    "[{phase}] failed: POST {path}: {} ({}) {}",
                    reply.status,
                    reply.cache_status,
                    reply.preview()
                ),
            );
            return;
        }
        let versions: Vec<(String, u64)> = String::from_utf8_lossy(&reply.body)
            .lines()
            .filter_map(|line| {
                let (path, version) = line.split_once(" v")?;
                Some((path.to_owned(), version.parse().ok()?))
            })
            .collect();
        self.raise_floors(&versions);
    }

    /// What an application does when data changed behind the layer's back:
    /// change it at the origin (every path under `prefix`), then call
    /// `invalidate` (an [`Invalidator`](tower_fence::Invalidator) call). From when the call returns,
    /// whatever it returns, no read may see the old data.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))] // cluster test only
    async fn change_then_invalidate<F>(
        &self,
        prefix: &str,
        invalidate: F,
    ) -> Result<u64, StoreError>
    where
        F: std::future::Future<Output = Result<u64, StoreError>>,
    {
        let phase = self.phase();
        let versions = self.origin.bump(prefix);
        let result = tokio::time::timeout(REQUEST_TIMEOUT, invalidate).await;
        self.raise_floors(&versions);
        result.unwrap_or_else(|_| {
            self.problem(
                phase,
                |c| &mut c.failed,
                format!("[{phase}] failed: an invalidation of {prefix} hung"),
            );
            Err(StoreError::timeout())
        })
    }

    /// Reads every path until it is a hit: the cache holds all of them.
    async fn warm(&self, app: &Router, paths: &[String]) {
        for path in paths {
            let mut cached = false;
            for _ in 0..100 {
                if self.read(app, path).await.is_some_and(|r| r.is_hit()) {
                    cached = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                cached,
                "{path} was never served from the cache while warming up"
            );
        }
    }

    /// Asserts no request failed, got a wrong body or a stale one.
    fn assert_clean(&self, test: &str) {
        let counts = self.counts();
        eprintln!("{test}: {counts:?}");
        let problems = self.problems.lock().unwrap();
        assert!(
            counts.failed == 0 && counts.wrong == 0 && counts.stale == 0,
            "{test}: {} failed, {} wrong, {} stale of {} reads and {} writes; problems by phase: \
             {:?}; stale reads by phase and path: {:?}; first problems:\n{}",
            counts.failed,
            counts.wrong,
            counts.stale,
            counts.reads,
            counts.writes,
            self.by_phase.lock().unwrap(),
            self.stale_paths.lock().unwrap(),
            problems.join("\n")
        );
    }
}

/// Checked reads of every path in `paths` at once.
async fn read_all(check: &Arc<Check>, app: &Router, paths: &[String]) {
    let reads: Vec<JoinHandle<()>> = paths
        .iter()
        .map(|path| {
            let (check, app, path) = (check.clone(), app.clone(), path.clone());
            tokio::spawn(async move {
                check.read(&app, &path).await;
            })
        })
        .collect();
    for read in reads {
        read.await.unwrap();
    }
}

/// Checked writes of every path in `paths` at once.
async fn write_all(check: &Arc<Check>, app: &Router, paths: &[String]) {
    let writes: Vec<JoinHandle<()>> = paths
        .iter()
        .map(|path| {
            let (check, app, path) = (check.clone(), app.clone(), path.clone());
            tokio::spawn(async move { check.write(&app, &path).await })
        })
        .collect();
    for write in writes {
        write.await.unwrap();
    }
}

/// Load: workers that read random paths and, `writes_in_100` times in a
/// hundred, write one (one write in four to the path's whole group).
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(
        check: &Arc<Check>,
        app: &Router,
        workers: u64,
        paths: &[String],
        writes_in_100: u32,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|seed| {
                let (check, app, stop) = (check.clone(), app.clone(), stop.clone());
                let paths = paths.to_vec();
                tokio::spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(seed);
                    while !stop.load(Ordering::Relaxed) {
                        let path = &paths[rng.usize(..paths.len())];
                        if rng.u32(..100) < writes_in_100 {
                            if rng.u32(..4) == 0 {
                                let group = path.rsplit_once('/').map_or("/", |(g, _)| g);
                                check.write(&app, group).await;
                            } else {
                                check.write(&app, path).await;
                            }
                        } else {
                            check.read(&app, path).await;
                        }
                        tokio::time::sleep(PACE).await;
                    }
                })
            })
            .collect();
        Load { stop, workers }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.unwrap();
        }
    }
}

/// Polls `done` until it holds, for at most `bound`: how long it took.
async fn until(bound: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < bound {
        if done() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn redis_builder(pool: bb8::Pool<RedisConnectionManager>) -> FenceLayerBuilder {
    FenceLayer::builder().redis(pool)
}

/// The value of `name:` in an `INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
}

// ---------------------------------------------------------------------------
// 1. Killed and restarted
// ---------------------------------------------------------------------------

/// Redis is SIGKILLed under load and restarted on the same port (empty):
/// no request fails or gets a wrong or stale body meanwhile, and the cache
/// serves hits again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_fails_open_and_caching_resumes_after_its_restart() {
    let mut redis = RedisProcess::start_async().await;
    let check = Check::new(Origin::new(4, 8, 0));
    let layer = redis_builder(redis.pool().await)
        .store_timeout(Duration::from_millis(250))
        .invalidation_timeout(Duration::from_secs(1))
        .wait_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let app = check.origin.router().layer(layer.clone());
    let paths = check.origin.paths();
    check.warm(&app, &paths).await;
    check.set_phase("load");
    let load = Load::start(&check, &app, 8, &paths, 5);
    let hits = check.hits();
    assert!(
        until(RECOVERY_BOUND, || check.hits() > hits + 50)
            .await
            .is_some(),
        "no hits under load before the kill"
    );

    check.set_phase("killed");
    redis.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;

    check.set_phase("restarted");
    let hits = check.hits();
    let mut redis = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .unwrap();
    let recovered = until(RECOVERY_BOUND, || check.hits() > hits + 20).await;
    eprintln!("killed Redis: hits again {recovered:?} after its restart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop().await;

    eprintln!("killed Redis: {:?}", layer.stats());
    assert!(
        recovered.is_some(),
        "no hits within {RECOVERY_BOUND:?} of the restart: {:?}",
        layer.stats()
    );
    check.assert_clean("killed Redis");
    redis.stop();
}

// ---------------------------------------------------------------------------
// 2. Frozen past every timeout
// ---------------------------------------------------------------------------

/// How long Redis stays frozen: well past every timeout of the layer below.
const FREEZE: Duration = Duration::from_millis(1500);

/// Redis is SIGSTOPped under load for longer than the store, wait and
/// invalidation timeouts; writes and reads go on meanwhile, then it is
/// SIGCONTed. No request fails or gets a wrong body, and no read is older
/// than a write that had returned: neither while frozen, nor right after,
/// nor later. The writes' invalidations could not be applied while Redis
/// was frozen; what they would have removed must not be served after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_serves_no_read_older_than_a_completed_write() {
    let redis = RedisProcess::start_async().await;
    let check = Check::new(Origin::new(4, 8, 0));
    let layer = redis_builder(redis.pool().await)
        .store_timeout(Duration::from_millis(100))
        .invalidation_timeout(Duration::from_millis(300))
        .wait_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let app = check.origin.router().layer(layer.clone());
    let paths = check.origin.paths();
    check.warm(&app, &paths).await;
    check.set_phase("load");
    let load = Load::start(&check, &app, 6, &paths, 5);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Every path of g0 written on its own and g1 as a whole, all cached
    // before the freeze; each write returns once its invalidation's budget
    // is spent.
    let written: Vec<String> = check
        .origin
        .group("g0")
        .into_iter()
        .chain(check.origin.group("g1"))
        .collect();
    let mut writes = check.origin.group("g0");
    writes.push("/g1".to_owned());
    check.warm(&app, &written).await;

    redis.pause();
    let frozen = Instant::now();
    check.set_phase("frozen");
    write_all(&check, &app, &writes).await;
    read_all(&check, &app, &written).await;
    tokio::time::sleep(FREEZE.saturating_sub(frozen.elapsed())).await;
    check.set_phase("thawing");
    redis.resume();
    check.set_phase("right after the thaw");
    read_all(&check, &app, &written).await;
    check.set_phase("after the thaw");
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        read_all(&check, &app, &written).await;
    }
    load.stop().await;

    eprintln!("frozen Redis: {:?}", layer.stats());
    check.assert_clean("frozen Redis");
}

// ---------------------------------------------------------------------------
// 3. Out of memory
// ---------------------------------------------------------------------------

/// Redis may only grow by 256 KiB past what it holds (`maxmemory`) and
/// evicts nothing (`noeviction`): leases and fills start failing with OOM
/// under load, and every answer is still the origin's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_that_evicts_nothing_serves_the_origins_bodies() {
    let redis = RedisProcess::start_async().await;
    // About 4 KiB per entry, 128 paths: twice what fits.
    let check = Check::new(Origin::new(8, 16, 4096));
    let layer = redis_builder(redis.pool().await)
        .store_timeout(Duration::from_secs(1))
        .invalidation_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let app = check.origin.router().layer(layer.clone());
    let paths = check.origin.paths();
    // Connected (pool, fill feed) before the memory is measured.
    check.warm(&app, &paths[..1]).await;

    let command = |args: &[&str]| {
        raw_command(redis.port(), args, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    let info = command(&["INFO", "memory"]);
    let used: u64 = info_field(&info, "used_memory")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no used_memory in {info}"));
    let limit = (used + 256 * 1024).to_string();
    assert_eq!(
        command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    assert_eq!(command(&["CONFIG", "SET", "maxmemory", &limit]), "OK");

    check.set_phase("load");
    let load = Load::start(&check, &app, 8, &paths, 5);
    let stats = layer.clone();
    let full = until(RECOVERY_BOUND, || stats.stats().store_errors > 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop().await;
    check.set_phase("after the load");
    read_all(&check, &app, &paths).await;

    let stats = layer.stats();
    eprintln!("full Redis: {stats:?}");
    assert!(
        full.is_some(),
        "Redis never refused a write: the limit was not reached ({stats:?})"
    );
    assert!(stats.stores > 0, "nothing was ever stored: {stats:?}");
    check.assert_clean("full Redis");
}

// ---------------------------------------------------------------------------
// 4. Overwritten records
// ---------------------------------------------------------------------------

/// While the load runs, the stored entries are overwritten in Redis with
/// garbage, with truncated copies of themselves and with other keys' valid
/// records. None of it is ever served, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwritten_records_are_never_served() {
    let redis = RedisProcess::start_async().await;
    let check = Check::new(Origin::new(3, 8, 64));
    let layer = redis_builder(redis.pool().await)
        .store_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let app = check.origin.router().layer(layer.clone());
    let paths = check.origin.paths();
    check.warm(&app, &paths).await;
    // The entries' keys as they are in Redis (leases and sets left out).
    let keys: Vec<String> = redis
        .keys_matching("tf:/*")
        .await
        .into_iter()
        .filter(|key| !key.ends_with(":lease"))
        .collect();
    assert_eq!(keys.len(), paths.len(), "one entry per path: {keys:?}");

    check.set_phase("load, records overwritten");
    let load = Load::start(&check, &app, 6, &paths, 5);
    let stop = Arc::new(AtomicBool::new(false));
    let corrupter = tokio::spawn({
        let (stop, mut conn) = (stop.clone(), redis.conn().await);
        async move {
            let mut rng = fastrand::Rng::with_seed(10);
            let mut overwritten = [0u64; 3];
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let key = &keys[rng.usize(..keys.len())];
                let record: Option<Vec<u8>> = match n % 3 {
                    // Garbage: random bytes, some behind the entry's magic
                    // and codec version.
                    0 => {
                        let mut garbage: Vec<u8> = if rng.bool() {
                            b"TF\x02".to_vec()
                        } else {
                            Vec::new()
                        };
                        garbage.extend((0..rng.usize(..200)).map(|_| rng.u8(..)));
                        Some(garbage)
                    }
                    // Truncated: the record cut anywhere short of its end.
                    1 => {
                        let record: Option<Vec<u8>> = redis::cmd("GET")
                            .arg(key)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        record
                            .filter(|r| !r.is_empty())
                            .map(|r| r[..rng.usize(..r.len())].to_vec())
                    }
                    // Another key's valid record.
                    _ => {
                        let other = &keys[rng.usize(..keys.len())];
                        let record: Option<Vec<u8>> = redis::cmd("GET")
                            .arg(other)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        record.filter(|_| other != key)
                    }
                };
                if let Some(record) = record {
                    let () = redis::cmd("SET")
                        .arg(key)
                        .arg(record)
                        .arg("PX")
                        .arg(60_000)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    overwritten[n % 3] += 1;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            overwritten
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let [garbage, truncated, foreign] = corrupter.await.unwrap();
    load.stop().await;
    check.set_phase("after the load");
    read_all(&check, &app, &paths).await;

    let stats = layer.stats();
    eprintln!(
        "overwritten records: {garbage} garbage, {truncated} truncated, {foreign} of other keys; \
         {stats:?}"
    );
    assert!(garbage > 0 && truncated > 0 && foreign > 0);
    assert!(
        stats.decode_errors > 0,
        "no overwritten record was ever read: {stats:?}"
    );
    check.assert_clean("overwritten records");
}

// ---------------------------------------------------------------------------
// 5. One connection for everyone
// ---------------------------------------------------------------------------

/// A bb8 pool of one connection under 200 concurrent requests on 20 paths
/// (one in ten a write), cold and then warm: nothing fails, and the warm
/// round is served from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_one_connection_serves_two_hundred_concurrent_requests() {
    let redis = RedisProcess::start_async().await;
    let pool = bb8::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(2))
        .build(RedisConnectionManager::new(redis.url()).unwrap())
        .await
        .unwrap();
    let check = Check::new(Origin::new(4, 5, 0));
    let layer = redis_builder(pool)
        .store_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let app = check.origin.router().layer(layer.clone());
    let paths = check.origin.paths();

    check.set_phase("cold, with writes");
    let requests: Vec<JoinHandle<()>> = (0..200)
        .map(|i| {
            let (check, app) = (check.clone(), app.clone());
            let path = paths[i % paths.len()].clone();
            tokio::spawn(async move {
                if i % 10 == 9 {
                    check.write(&app, &path).await;
                } else {
                    check.read(&app, &path).await;
                }
            })
        })
        .collect();
    for request in requests {
        request.await.unwrap();
    }
    // Let the last fills land.
    tokio::time::sleep(Duration::from_millis(200)).await;

    check.set_phase("warm");
    let hits = check.hits();
    let warm: Vec<String> = (0..200).map(|i| paths[i % paths.len()].clone()).collect();
    read_all(&check, &app, &warm).await;
    let warm_hits = check.hits() - hits;

    eprintln!(
        "pool of one: {warm_hits} hits of 200 warm reads; {:?}",
        layer.stats()
    );
    check.assert_clean("pool of one");
    assert!(
        warm_hits >= 100,
        "{warm_hits} hits of 200 warm reads: {:?}",
        layer.stats()
    );
}

// ---------------------------------------------------------------------------
// 6. A Redis Cluster fails over
// ---------------------------------------------------------------------------

#[cfg(feature = "cluster")]
mod cluster_failover {
    use super::*;
    use support::RedisCluster;
    use tower_fence::store::RedisClusterStore;

    /// A cluster of three masters with a replica each; a master is killed
    /// under load (reads only: a write just before the kill could be lost
    /// with the master's unreplicated tail, which is Redis's asynchronous
    /// replication, not the layer). While it fails over, invalidations are
    /// issued twice: right after the kill (the master is only suspected),
    /// and once the cluster agreed it failed (its slots are served by
    /// nobody until its replica takes over): a group written (a prefix
    /// invalidation) and another group's tag invalidated each time, and the
    /// second time also each path of a fifth group invalidated exactly. No
    /// request fails or gets a wrong body, the cache serves hits again by
    /// itself, and none of those invalidations is lost: no read is older
    /// than them, during the failover or after. An `Invalidator` call
    /// that returned an error counts as issued too (DESIGN.md, guarantee 2:
    /// invalidations that could not be applied are made up for before the
    /// store is trusted again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_master_failover_loses_no_invalidation() {
        let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with_replicas(3, 1))
            .await
            .expect("RedisCluster::start_with_replicas panicked");
        assert_eq!(cluster.masters().len(), 3);
        assert_eq!(cluster.replicas().len(), 3);
        let check = Check::new(Origin::new(5, 8, 0));
        let layer = FenceLayer::builder()
            .store(RedisClusterStore::new(cluster.nodes()).expect("valid node addresses"))
            .store_timeout(Duration::from_millis(250))
            .invalidation_timeout(Duration::from_secs(1))
            .wait_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let invalidator = layer.invalidator();
        let app = check.origin.router().layer(layer.clone());
        let paths = check.origin.paths();
        check.warm(&app, &paths).await;
        tokio::task::block_in_place(|| cluster.wait_replicas_synced(Duration::from_secs(10)));

        // The paths whose entries the victim holds (and its replica).
        let victim = cluster.masters()[0];
        let victim_port = cluster.processes()[victim].port();
        let victim_paths: Vec<String> = cluster.processes()[victim]
            .keys_matching("tf:/*")
            .await
            .into_iter()
            .filter(|key| !key.ends_with(":lease"))
            .filter_map(|key| Some(key.strip_prefix("tf:")?.split('#').next()?.to_owned()))
            .collect();
        assert!(!victim_paths.is_empty(), "the victim holds no entry");

        check.set_phase("load");
        let load = Load::start(&check, &app, 6, &paths, 0);
        tokio::time::sleep(Duration::from_millis(300)).await;

        check.set_phase("master killed");
        let killed = Instant::now();
        tokio::task::block_in_place(|| cluster.kill(victim));
        let (_, early_tag) = tokio::join!(
            check.write(&app, "/g0"),
            check.change_then_invalidate("/g1", invalidator.invalidate_tag("tag-g1")),
        );
        let early = killed.elapsed();
        let flagged = until(RECOVERY_BOUND, || {
            tokio::task::block_in_place(|| cluster.is_flagged_failed(victim_port))
        })
        .await
        .map(|_| killed.elapsed());
        check.set_phase("master flagged failed");
        let late_paths = check.origin.group("g4");
        let exact = late_paths.iter().map(|path| {
            let path = path.clone();
            let (check, invalidator) = (check.clone(), invalidator.clone());
            tokio::spawn(async move {
                let invalidate = invalidator.invalidate_path(&path);
                let result = check.change_then_invalidate(&path, invalidate).await;
                (path, result)
            })
        });
        let exact: Vec<JoinHandle<(String, Result<u64, StoreError>)>> = exact.collect();
        let (_, late_tag) = tokio::join!(
            check.write(&app, "/g2"),
            check.change_then_invalidate("/g3", invalidator.invalidate_tag("tag-g3")),
        );
        let mut exact_results = Vec::new();
        for path in exact {
            exact_results.push(path.await.unwrap());
        }
        let late = killed.elapsed();
        tokio::task::block_in_place(|| cluster.wait_failed_over(Duration::from_secs(30)));
        let failed_over = killed.elapsed();

        check.set_phase("failed over");
        let hits = check.hits_on(&victim_paths);
        let resumed = until(RECOVERY_BOUND, || check.hits_on(&victim_paths) > hits)
            .await
            .map(|_| killed.elapsed());
        eprintln!(
            "cluster failover, times after the kill: first invalidations done {early:?} (tag: \
             {early_tag:?}); master flagged failed {flagged:?}; second invalidations done \
             {late:?} (tag: {late_tag:?}); failed over {failed_over:?}; hits on the killed \
             master's slots again {resumed:?}"
        );
        for (path, result) in &exact_results {
            let on_victim = if victim_paths.contains(path) {
                "on the killed master"
            } else {
                "elsewhere"
            };
            eprintln!("cluster failover: invalidate_path({path}) ({on_victim}): {result:?}");
        }
        check.set_phase("after recovery");
        for _ in 0..3 {
            read_all(&check, &app, &paths).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        load.stop().await;

        eprintln!("cluster failover: {:?}", layer.stats());
        assert!(
            resumed.is_some(),
            "no hit on the killed master's slots within {RECOVERY_BOUND:?} of the failover: {:?}",
            layer.stats()
        );
        check.assert_clean("cluster failover");
    }
}
