//! Invalidation: writes remove the cached paths they touch; an
//! [`Invalidator`] does the same from application code.
//!
//! After a request with an unsafe method (RFC 9111 §4.4: anything but `GET`,
//! `HEAD`, `OPTIONS`, `TRACE`; configurable) gets a non-error response
//! (2xx, 3xx), the layer invalidates:
//!
//! - the request path and every cached path under it ([`Target::Prefix`]):
//!   a `PUT /users/42` removes `/users/42`, `/users/42?x=1` and
//!   `/users/42/posts`, never `/users/420`;
//! - the same-origin URIs in `Location` and `Content-Location`, exactly
//!   ([`Target::Path`]): all their query strings and variants, nothing
//!   under them. A login form that answers `303 See Other` with
//!   `Location: /` removes the home page, not the cache;
//! - the prefixes and tags of the route's rules, if any.
//!
//! A write to `/` itself invalidates `/` exactly, like a `Location`: the
//! whole cache goes only with
//! [`invalidate_root_prefix(true)`](crate::FenceLayerBuilder::invalidate_root_prefix),
//! or when asked explicitly (a rule's `invalidate(["/"])`,
//! [`Invalidator::invalidate_prefix("/")`](Invalidator::invalidate_prefix)).
//! gRPC calls (`content-type: application/grpc…`) are `POST`s but not
//! writes: they invalidate nothing and cost no store command.
//!
//! An invalidation removes the rebuild leases of what it selects first (every
//! selected key that ends in `:lease`), then the entries, so a rebuild that
//! started before the write cannot store its (old) result afterwards.
//!
//! Paths whose escaped form is longer than a key keeps readable (512 bytes)
//! share their keys' cut form: invalidating one also invalidates the others
//! that share the cut (more than asked, never less).
//!
//! # Prefix strategies
//!
//! - [`PrefixStrategy::Scan`] (default): `SCAN MATCH {ns}{path}[#/]* COUNT
//!   500` and `UNLINK` in batches — never `KEYS`; an exact path matches
//!   `{ns}{path}#*`. Nothing extra is written on a fill, but each
//!   invalidation walks the whole keyspace twice (leases first, then
//!   entries; see [`Store::delete_matching`](crate::store::Store::delete_matching)):
//!   about one `SCAN` step per 500 keys in Redis, however few match.
//! - [`PrefixStrategy::Index`]: each fill adds its key to a set per path
//!   prefix (its own path and each ancestor, written in the fill's round
//!   trip, expiring with the entries); an invalidation reads one set with
//!   `SSCAN` and unlinks its members (for an exact path or one key, it
//!   reads the set of the path and unlinks only that path's or key's
//!   members: `/` reads every indexed key). Its cost grows with the entries
//!   under the prefix, not with the keyspace, at the price of a few `SADD`s
//!   per fill and the sets' memory. Pick it when Redis holds many keys
//!   besides the ones a prefix selects.
//!
//! # Tags
//!
//! A response may name tags in a header (`Surrogate-Key: user-42 users` by
//! default; the header never leaves the layer). The entry joins one set per
//! tag, and invalidating a tag unlinks the set's members: no scan. A
//! rebuild's tags are known only from its response, too late for its lease
//! to join their sets; so while tags are in use every lease and permit
//! joins the namespace's in-flight set, and a tag invalidation unlinks those
//! first: every rebuild running then stores nothing (its waiters look
//! again), and none can store what it read before the invalidation.
//!
//! # Modes and time
//!
//! [`InvalidationMode::Inline`] (default) invalidates before the write's
//! response is returned (read-your-writes): all the write's targets side by
//! side, within one budget,
//! [`invalidation_timeout`](crate::FenceLayerBuilder::invalidation_timeout)
//! (10 s by default) for the whole write. What fails, what the budget does
//! not cover, and what is left when the response future is dropped (the
//! client hung up, an outer timeout fired) goes to the background queue: a
//! write's invalidation is never dropped with its future.
//! [`InvalidationMode::Background`] returns at once and hands the work to
//! the queue. The queue is bounded; its worker retries with exponential
//! backoff and jitter, each attempt bounded by the same timeout; what still
//! fails is counted, logged and kept as a [`DeadLetter`]. Either way a
//! failed invalidation never turns a successful write into an error.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use http::header::{self, HeaderMap};
use http::{Request, StatusCode, Uri};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::error::StoreError;
use crate::flow::plan;
use crate::key;
use crate::owed::Debt;
use crate::shared::Shared;

pub(crate) mod config;
pub use config::{DeadLetter, InvalidationMode, PrefixStrategy, Purge, Target};
pub(crate) use config::{InvalidationConfig, Job, WriteMethods};

/// Most inline invalidation targets running at once (each bounded by the
/// invalidation timeout); past it a write's targets go to the queue.
const MAX_INLINE_RUNNING: usize = 1_024;
/// How often the queue probes a store whose breaker is open while it holds
/// invalidations the store owes.
const OWED_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Most dead letters kept; the oldest go first.
const DEAD_LETTER_CAPACITY: usize = 1_000;
/// First retry delay of the background queue; doubled per attempt.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// Longest retry delay of the background queue.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Invalidates cached entries from application code: by path prefix, by
/// exact path, by exact request, or by tag. Each call is bounded by the
/// [invalidation timeout](crate::FenceLayerBuilder::invalidation_timeout).
/// Cheap to clone; get one from
/// [`FenceLayer::invalidator`](crate::FenceLayer::invalidator).
///
/// ```
/// use tower_fence::FenceLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_fence::StoreError> {
/// let layer = FenceLayer::memory();
/// let invalidator = layer.invalidator();
/// // After a background job changed user 42:
/// invalidator.invalidate_prefix("/users/42").await?;
/// invalidator.invalidate_tag("user-42").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Invalidator {
    shared: Arc<Shared>,
    purge: Purge,
}

impl fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invalidator")
            .field("purge", &self.purge)
            .finish_non_exhaustive()
    }
}

impl Invalidator {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Invalidator {
            shared,
            purge: Purge::Hard,
        }
    }

    /// A handle whose calls soft-purge: they mark what they select stale
    /// instead of deleting it ([`Purge::Soft`]: served stale within grace
    /// while one refresh runs, no stampede after a purge; the price is that
    /// reads within grace may still see the old response). Rebuild leases
    /// are deleted all the same. The handle this is called on still
    /// purges as it did.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fence::StoreError> {
    /// use std::time::Duration;
    /// use tower_fence::FenceLayer;
    ///
    /// let layer = FenceLayer::builder().grace(Duration::from_secs(60)).build().unwrap();
    /// // The catalogue changed: refresh it, but keep serving it meanwhile.
    /// layer.invalidator().soft().invalidate_tag("catalogue").await?;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn soft(&self) -> Invalidator {
        Invalidator {
            shared: self.shared.clone(),
            purge: Purge::Soft,
        }
    }

    /// How this handle's calls purge: [`Purge::Hard`] unless it came from
    /// [`soft`](Self::soft).
    pub fn purge(&self) -> Purge {
        self.purge
    }

    /// Removes the entries at `path` and under it (`/users/42` also removes
    /// `/users/42?x=1` and `/users/42/posts`, never `/users/420`; `/`
    /// removes everything), and the rebuild leases there. Returns how many
    /// keys were removed.
    pub async fn invalidate_prefix(&self, path: &str) -> Result<u64, StoreError> {
        invalidate_now(&self.shared, Target::Prefix(path.to_owned()), self.purge).await
    }

    /// Removes the entries of exactly `path` (with any query string, every
    /// variant) and their rebuild leases, nothing under it: what a write's
    /// `Location` does. Returns how many keys were removed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fence::StoreError> {
    /// let invalidator = tower_fence::FenceLayer::memory().invalidator();
    /// // The home page, not the pages under it.
    /// invalidator.invalidate_path("/").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate_path(&self, path: &str) -> Result<u64, StoreError> {
        invalidate_now(&self.shared, Target::Path(path.to_owned()), self.purge).await
    }

    /// Removes the entries tagged `tag`.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64, StoreError> {
        invalidate_now(&self.shared, Target::Tag(tag.to_owned()), self.purge).await
    }

    /// Removes the entry `request` would be served from (its key with the
    /// route rule's key parts, as [`FenceLayer::cache_key`](crate::FenceLayer::cache_key)
    /// derives it), every variant of it when its responses vary (`Vary`),
    /// whatever the request's own header values, and their leases. Other query strings of the path are
    /// other entries. Returns how many keys were removed (the request's own
    /// key counts as one).
    pub async fn invalidate_request<B>(&self, request: &Request<B>) -> Result<u64, StoreError> {
        let key = plan::key_of_request(&self.shared, request);
        let target = Target::Key(key.as_str().to_owned());
        invalidate_now(&self.shared, target, self.purge).await
    }

    /// Invalidations that failed after every retry of the background queue,
    /// oldest first (at most 1,000 are kept).
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.shared.invalidation.dead_letters)
            .iter()
            .cloned()
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Carries out one target, bounded by the invalidation timeout, and counts
/// the outcome.
pub(crate) async fn run(shared: &Shared, target: &Target, purge: Purge) -> Result<u64, StoreError> {
    let work = execute(shared, target, purge);
    let result = tokio::time::timeout(shared.invalidation.timeout, work)
        .await
        .unwrap_or_else(|_| Err(StoreError::timeout()));
    record(shared, target, purge, &result);
    result
}

/// Carries out one target, unbounded.
async fn execute(shared: &Shared, target: &Target, purge: Purge) -> Result<u64, StoreError> {
    let namespace = &shared.key.namespace;
    let strategy = shared.invalidation.strategy;
    let store = &shared.store;
    let limit = shared.invalidation.timeout;
    // A soft purge marks entries stale from now on (leases go either way).
    let stale_at = (purge == Purge::Soft).then(|| shared.clock.now_ms());
    match target {
        Target::Prefix(path) => match strategy {
            PrefixStrategy::Scan => {
                let pattern = key::prefix_pattern(namespace, path);
                store.delete_matching(&pattern, stale_at, limit).await
            }
            PrefixStrategy::Index => {
                let set = key::index_set(namespace, path);
                store.delete_members(&set, stale_at, limit).await
            }
        },
        Target::Path(path) => {
            let pattern = key::path_pattern(namespace, path);
            match strategy {
                PrefixStrategy::Scan => store.delete_matching(&pattern, stale_at, limit).await,
                PrefixStrategy::Index => {
                    let set = key::path_index_set(namespace, path);
                    store
                        .delete_members_matching(&set, &pattern, stale_at, limit)
                        .await
                }
            }
        }
        Target::Tag(tag) => {
            // The leases of every rebuild running now first: one that read
            // the origin before this invalidation may be about to store an
            // entry with this tag (its tags come with its response). Then
            // the entries.
            store
                .delete_members(&key::inflight_set(namespace), None, limit)
                .await?;
            let set = key::tag_set(namespace, tag);
            store.delete_members(&set, stale_at, limit).await
        }
        Target::Key(key) => {
            // The key, its variants (`{key}.v…`, filled by requests with
            // other header values) and all their leases.
            let pattern = key::key_pattern(key);
            match (strategy, key::key_index_set(namespace, key)) {
                (PrefixStrategy::Index, Some(set)) => {
                    // Variants and leases joined the path's index set; a
                    // vary stub joins none.
                    let removed = store
                        .delete_members_matching(&set, &pattern, stale_at, limit)
                        .await?;
                    Ok(removed + store.purge_key(key, stale_at, limit).await?)
                }
                _ => store.delete_matching(&pattern, stale_at, limit).await,
            }
        }
    }
}

/// Counts and logs the outcome of one target.
fn record(shared: &Shared, target: &Target, purge: Purge, result: &Result<u64, StoreError>) {
    match result {
        Ok(changed) => {
            shared.bump(|c| &c.invalidations);
            crate::metrics::invalidation(purge.label(), Some(*changed));
            tracing::debug!(%target, ?purge, changed, "tower-fence: invalidated");
        }
        Err(err) => {
            shared.bump(|c| &c.invalidation_errors);
            crate::metrics::invalidation(purge.label(), None);
            tracing::warn!(%target, ?purge, error = %err, "tower-fence: invalidation failed");
        }
    }
}

/// What a write touched: its path and what is under it (`/` exactly,
/// unless the root prefix is opted in), and exactly the same-origin paths
/// its response names in `Location` and `Content-Location` (RFC 9111 §4.4).
pub(crate) fn targets_of_write(
    shared: &Shared,
    request_uri: &Uri,
    request_host: Option<&str>,
    status: StatusCode,
    response_headers: &HeaderMap,
) -> Vec<Target> {
    targets_of(
        shared.invalidation.root_prefix,
        request_uri,
        request_host,
        status,
        response_headers,
    )
}

fn targets_of(
    root_prefix: bool,
    request_uri: &Uri,
    request_host: Option<&str>,
    status: StatusCode,
    response_headers: &HeaderMap,
) -> Vec<Target> {
    if !(status.is_success() || status.is_redirection()) {
        return Vec::new();
    }
    let path = request_uri.path();
    let own = if key::is_root(path) && !root_prefix {
        Target::Path(path.to_owned())
    } else {
        Target::Prefix(path.to_owned())
    };
    let mut targets = vec![own];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = response_headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Some(path) = same_origin_path(request_uri, request_host, value) else {
            continue;
        };
        // Already selected by the write's own prefix: no second walk.
        let covered = targets.iter().any(|target| match target {
            Target::Prefix(prefix) => key::under_prefix(prefix, &path),
            Target::Path(other) => *other == path,
            _ => false,
        });
        if !covered {
            targets.push(Target::Path(path));
        }
    }
    targets
}

/// The path `reference` points at, if it is on the request's origin.
fn same_origin_path(
    request_uri: &Uri,
    request_host: Option<&str>,
    reference: &str,
) -> Option<String> {
    let reference = reference.trim();
    if reference.starts_with("//") {
        // Network-path reference: same origin only with the same host.
        let uri: Uri = format!("http:{reference}").parse().ok()?;
        return same_host(uri.authority()?.as_str(), request_uri, request_host)
            .then(|| uri.path().to_owned());
    }
    if reference.starts_with('/') {
        let uri: Uri = reference.parse().ok()?;
        return Some(uri.path().to_owned());
    }
    if let Ok(uri) = reference.parse::<Uri>() {
        if let Some(authority) = uri.authority() {
            if !matches!(uri.scheme_str(), Some("http" | "https")) {
                return None;
            }
            return same_host(authority.as_str(), request_uri, request_host)
                .then(|| uri.path().to_owned());
        }
    }
    // A relative reference: resolve against the request path's directory.
    let base = request_uri.path();
    let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
    let joined = format!("{dir}{reference}");
    let uri: Uri = joined.parse().ok()?;
    Some(normalize_dots(uri.path()))
}

fn same_host(authority: &str, request_uri: &Uri, request_host: Option<&str>) -> bool {
    let own = request_uri
        .authority()
        .map(|a| a.as_str())
        .or(request_host)
        .unwrap_or("");
    !own.is_empty() && authority.eq_ignore_ascii_case(own)
}

/// Removes `.` and `..` segments (RFC 3986 §5.2.4).
fn normalize_dots(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/').skip(1) {
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Invalidates `targets` now, side by side, each in a task of its own. The
/// write's response waits for them up to the write budget (not at all
/// while the store's breaker is open). A target that fails is queued for
/// retries; one still running when the budget ends, or when this future is
/// dropped (the client hung up), runs on. Either way the write leaves a
/// debt until the target is applied: this process serves no entry
/// generated before the write meanwhile.
pub(crate) async fn inline(shared: Arc<Shared>, targets: Vec<Target>) {
    let since_ms = shared.clock.now_ms();
    let purge = shared.invalidation.purge;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        for target in targets {
            owe(&shared, target, purge, since_ms);
        }
        return;
    };
    let running_now = shared.invalidation.running.load(Ordering::Relaxed);
    if shared.store.breaker().is_open() || running_now + targets.len() > MAX_INLINE_RUNNING {
        // A sick store (or a backlog of writes waiting on a slow one): the
        // write does not wait for it at all.
        for target in targets {
            owe(&shared, target, purge, since_ms);
        }
        return;
    }
    let mut running = Running {
        shared: shared.clone(),
        since_ms,
        tasks: targets
            .into_iter()
            .map(|target| {
                let shared = shared.clone();
                let work = target.clone();
                shared.invalidation.running.fetch_add(1, Ordering::Relaxed);
                let task = async move {
                    let done = run(&shared, &work, purge).await.is_ok();
                    shared.invalidation.running.fetch_sub(1, Ordering::Relaxed);
                    done
                };
                // In the write's span: one trace for the write and what it
                // invalidated.
                let task = runtime.spawn(task.instrument(tracing::Span::current()));
                Some((target, task))
            })
            .collect(),
    };
    let all = std::future::poll_fn(|cx| {
        let mut pending = false;
        for slot in &mut running.tasks {
            let Some((_, task)) = slot else { continue };
            let Poll::Ready(done) = Pin::new(task).poll(cx) else {
                pending = true;
                continue;
            };
            let (target, _) = slot.take().expect("a running task");
            if !done.unwrap_or(false) {
                owe(&shared, target, purge, since_ms);
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    });
    if tokio::time::timeout(shared.invalidation.write_budget, all)
        .await
        .is_err()
    {
        for (target, _) in running.tasks.iter().flatten() {
            tracing::debug!(
                %target,
                budget = ?shared.invalidation.write_budget,
                "tower-fence: invalidation runs on past the write's budget"
            );
        }
    }
    // Dropping `running` leaves a debt for each target still running.
}

/// The targets of an inline invalidation still running, each with its
/// task. Dropped (at the end of [`inline`], or with the write's future),
/// it opens a debt for each and lets the task run on: paid when the task
/// succeeds, queued for retries when it fails.
struct Running {
    shared: Arc<Shared>,
    since_ms: u64,
    tasks: Vec<Option<(Target, tokio::task::JoinHandle<bool>)>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let purge = self.shared.invalidation.purge;
        for (target, task) in self.tasks.drain(..).flatten() {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                owe(&self.shared, target, purge, self.since_ms);
                continue;
            };
            let debt = self.shared.store.owed().owe(self.since_ms);
            let shared = self.shared.clone();
            let settle = async move {
                if task.await.unwrap_or(false) {
                    shared.store.owed().pay(debt);
                } else {
                    retry_owed(&shared, target, purge, debt);
                }
            };
            runtime.spawn(settle.instrument(tracing::Span::current()));
        }
    }
}

/// A write's target that was not applied: a debt until the queue applies
/// it.
fn owe(shared: &Arc<Shared>, target: Target, purge: Purge, since_ms: u64) {
    let debt = shared.store.owed().owe(since_ms);
    retry_owed(shared, target, purge, debt);
}

/// Queues `target`, tried once already, under `debt`.
fn retry_owed(shared: &Arc<Shared>, target: Target, purge: Purge, debt: Debt) {
    enqueue(
        shared,
        Job {
            target,
            purge,
            attempt: 1,
            debt: Some(debt),
        },
    );
}

/// A target of an [`Invalidator`] call, bounded by the invalidation
/// timeout. If it fails, it is also queued, and until it is applied this
/// process serves no entry generated before the call.
async fn invalidate_now(
    shared: &Arc<Shared>,
    target: Target,
    purge: Purge,
) -> Result<u64, StoreError> {
    let since_ms = shared.clock.now_ms();
    let result = run(shared, &target, purge).await;
    if result.is_err() {
        owe(shared, target, purge, since_ms);
    }
    // As after a write: no request that comes after this call joins a
    // rebuild or a read that started before it.
    shared.write_done();
    result
}

/// Hands `job` to the background queue (started on first use).
pub(crate) fn enqueue(shared: &Arc<Shared>, job: Job) {
    let Some(queue) = queue(shared) else {
        dead_letter(
            shared,
            job,
            "no tokio runtime for the invalidation queue".into(),
        );
        return;
    };
    if let Err(err) = queue.try_send(job) {
        let job = match err {
            mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => job,
        };
        dead_letter(shared, job, "invalidation queue full".into());
    }
}

fn queue(shared: &Arc<Shared>) -> Option<&mpsc::Sender<Job>> {
    if let Some(queue) = shared.invalidation.queue.get() {
        return Some(queue);
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (tx, rx) = mpsc::channel(shared.invalidation.queue_capacity.max(1));
    if shared.invalidation.queue.set(tx).is_ok() {
        runtime.spawn(worker(Arc::downgrade(shared), rx));
    }
    shared.invalidation.queue.get()
}

/// Runs queued invalidations one at a time; a failed one is retried after
/// an exponential, jittered delay, up to the configured attempts. While the
/// store's breaker is open a job does not use an attempt: every 50 ms the
/// queue probes the store itself (one bounded read; requests keep skipping
/// it for the cool-down), so it applies what the store owes as soon as the
/// store answers again.
async fn worker(shared: std::sync::Weak<Shared>, mut rx: mpsc::Receiver<Job>) {
    while let Some(mut job) = rx.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let err = match run(&shared, &job.target, job.purge).await {
            Ok(_) => {
                if let Some(debt) = job.debt {
                    shared.store.owed().pay(debt);
                }
                continue;
            }
            Err(err) => err,
        };
        let delay = if err.is_skipped() {
            // The store is skipped: probe it often (not once per cool-down
            // as requests do), so that what it owes is applied as soon as
            // it answers, before other processes read from it again.
            if shared.store.probe().await {
                enqueue(&shared, job);
                continue;
            }
            OWED_PROBE_INTERVAL
        } else {
            job.attempt += 1;
            if job.attempt >= shared.invalidation.max_attempts {
                dead_letter(&shared, job, err.to_string());
                continue;
            }
            backoff(job.attempt - 1)
        };
        let retry_shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            enqueue(&retry_shared, job);
        });
    }
}

/// Exponential backoff with full jitter: uniform in `[d/2, d]` where `d`
/// doubles from 100 ms per attempt, capped at 10 s.
fn backoff(attempt: u32) -> Duration {
    let ceiling = RETRY_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(RETRY_MAX);
    let half = ceiling / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Gives `job` up: counted, logged, kept as a dead letter; its debt is
/// written off (entries generated before its write are never served again
/// by this process).
fn dead_letter(shared: &Shared, job: Job, error: String) {
    shared.bump(|c| &c.invalidations_dead);
    let Job {
        target,
        purge,
        attempt: attempts,
        debt,
    } = job;
    if let Some(debt) = debt {
        shared.store.owed().write_off(debt);
    }
    tracing::error!(%target, attempts, %error, "tower-fence: invalidation given up");
    let mut dead = lock(&shared.invalidation.dead_letters);
    if dead.len() >= DEAD_LETTER_CAPACITY {
        dead.pop_front();
    }
    dead.push_back(DeadLetter {
        target,
        purge,
        attempts,
        error,
    });
}

/// The tags a response names in the tag header.
pub(crate) fn tags(shared: &Shared, headers: &HeaderMap) -> Vec<String> {
    let Some(name) = &shared.invalidation.tag_header else {
        return Vec::new();
    };
    let mut tags: Vec<String> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([' ', ',']))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

/// Removes the tag header: it never leaves the layer.
pub(crate) fn strip_tags(shared: &Shared, headers: &mut HeaderMap) {
    if shared.invalidation.forward_tags {
        return;
    }
    if let Some(name) = &shared.invalidation.tag_header {
        headers.remove(name);
    }
}

/// The sets a fill of `path` joins: its index sets, and those of the tags
/// the response names and of the route's tags.
pub(crate) fn fill_sets(
    shared: &Shared,
    path: &str,
    response_tags: &[String],
    route_tags: &[String],
) -> Vec<String> {
    let namespace = &shared.key.namespace;
    // The index sets of the path, as its leases; not the in-flight set,
    // which holds leases only.
    let mut sets = index_sets(shared, path);
    let tags = response_tags.iter().chain(route_tags);
    sets.extend(tags.map(|tag| key::tag_set(namespace, tag)));
    sets
}

/// The sets a rebuild lease of `path` joins: the index sets of its path
/// (index strategy), and the namespace's in-flight set while tags are in
/// use (a tag invalidation fences every rebuild running then).
pub(crate) fn lease_sets(shared: &Shared, path: &str) -> Vec<String> {
    let mut sets = index_sets(shared, path);
    if shared.invalidation.tags_in_use {
        sets.push(key::inflight_set(&shared.key.namespace));
    }
    sets
}

/// The index sets of `path` (index strategy only).
fn index_sets(shared: &Shared, path: &str) -> Vec<String> {
    match shared.invalidation.strategy {
        PrefixStrategy::Index => key::index_sets(&shared.key.namespace, path),
        PrefixStrategy::Scan => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn prefix(path: &str) -> Target {
        Target::Prefix(path.to_owned())
    }

    fn exact(path: &str) -> Target {
        Target::Path(path.to_owned())
    }

    fn targets(uri: &str, status: StatusCode, h: &HeaderMap) -> Vec<Target> {
        targets_of(false, &uri.parse().unwrap(), Some("example.com"), status, h)
    }

    #[test]
    fn writes_touch_their_prefix_and_same_origin_locations_exactly() {
        let h = headers(&[
            ("location", "/orders/42"),
            ("content-location", "http://example.com/orders/42/receipt"),
        ]);
        assert_eq!(
            targets("/checkout", StatusCode::CREATED, &h),
            [
                prefix("/checkout"),
                exact("/orders/42"),
                exact("/orders/42/receipt")
            ]
        );
    }

    #[test]
    fn locations_under_the_written_prefix_cost_nothing_more() {
        let h = headers(&[
            ("location", "/users/42"),
            ("content-location", "http://example.com/users/42/profile"),
        ]);
        assert_eq!(
            targets("/users", StatusCode::CREATED, &h),
            [prefix("/users")]
        );
        // The same path twice is one target; a sibling is another.
        let h = headers(&[("location", "/a/b"), ("content-location", "/a/b")]);
        assert_eq!(
            targets("/a/bc", StatusCode::OK, &h),
            [prefix("/a/bc"), exact("/a/b")]
        );
    }

    #[test]
    fn a_location_of_the_root_is_the_root_only() {
        let h = headers(&[("location", "/")]);
        assert_eq!(
            targets("/login", StatusCode::SEE_OTHER, &h),
            [prefix("/login"), exact("/")]
        );
    }

    #[test]
    fn a_write_to_the_root_is_the_root_only_unless_opted_in() {
        let h = HeaderMap::new();
        assert_eq!(targets("/", StatusCode::OK, &h), [exact("/")]);
        assert_eq!(targets("/?x=1", StatusCode::OK, &h), [exact("/")]);
        let uri: Uri = "/".parse().unwrap();
        assert_eq!(
            targets_of(true, &uri, None, StatusCode::OK, &h),
            [prefix("/")]
        );
        // With the root opted in, a Location is still exact (and covered).
        let h = headers(&[("location", "/x")]);
        assert_eq!(
            targets_of(true, &uri, None, StatusCode::OK, &h),
            [prefix("/")]
        );
    }

    #[test]
    fn foreign_and_failed_writes_touch_nothing_more() {
        let h = headers(&[("location", "https://elsewhere.example/users/1")]);
        assert_eq!(
            targets("/users/7", StatusCode::OK, &h),
            [prefix("/users/7")]
        );
        let uri: Uri = "/users/7".parse().unwrap();
        assert!(targets_of(false, &uri, None, StatusCode::BAD_REQUEST, &h).is_empty());
        assert!(targets_of(false, &uri, None, StatusCode::INTERNAL_SERVER_ERROR, &h).is_empty());
    }

    #[test]
    fn relative_locations_resolve_against_the_request() {
        let h = headers(&[("location", "../d")]);
        assert_eq!(
            targets("/a/b/c", StatusCode::SEE_OTHER, &h),
            [prefix("/a/b/c"), exact("/a/d")]
        );
    }

    #[test]
    fn method_sets() {
        assert!(WriteMethods::Unsafe.includes(&Method::POST));
        assert!(WriteMethods::Unsafe.includes(&Method::from_bytes(b"PURGE").unwrap()));
        assert!(!WriteMethods::Unsafe.includes(&Method::GET));
        assert!(!WriteMethods::Unsafe.includes(&Method::OPTIONS));
        assert!(WriteMethods::Only(vec![Method::PUT]).includes(&Method::PUT));
        assert!(!WriteMethods::Only(vec![Method::PUT]).includes(&Method::POST));
        assert!(!WriteMethods::None.includes(&Method::DELETE));
    }

    #[test]
    fn grpc_is_not_a_write() {
        assert!(config::is_grpc(&headers(&[(
            "content-type",
            "application/grpc+proto"
        )])));
        assert!(!config::is_grpc(&headers(&[(
            "content-type",
            "application/json"
        )])));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let delay = backoff(attempt);
            let ceiling = RETRY_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(RETRY_MAX);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{attempt}: {delay:?}"
            );
        }
    }
}
