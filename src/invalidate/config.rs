//! The types of invalidation: targets, strategies, modes, the settings a
//! layer keeps, and which requests are writes.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use http::header::{self, HeaderMap};
use http::Method;
use tokio::sync::mpsc;

/// How a path prefix is invalidated. See the [module docs](super).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PrefixStrategy {
    /// `SCAN MATCH` + `UNLINK` over the keyspace.
    #[default]
    Scan,
    /// Per-prefix index sets written with each fill, read with `SSCAN`.
    Index,
}

/// When a write's invalidation runs. See the [module docs](super).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum InvalidationMode {
    /// Before the write's response is returned.
    #[default]
    Inline,
    /// In a bounded background queue, with retries.
    Background,
}

/// How an invalidation treats the entries it selects. Either way it
/// deletes their rebuild leases first, so a rebuild that started before it
/// stores nothing.
///
/// ```
/// use tower_fence::invalidate::Purge;
///
/// assert_eq!(Purge::default(), Purge::Hard);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Purge {
    /// Delete the entries: the next request for one is a miss that waits
    /// for the origin. What a completed write guarantees (no read older
    /// than it) holds.
    #[default]
    Hard,
    /// Mark the entries stale instead (a *soft purge*, as CDNs call it):
    /// each keeps its grace, stale-if-error and validators. The next
    /// request for one within its grace is served the stale entry at once
    /// while one background refresh (fenced by a fresh lease) replaces it;
    /// past its grace, it is a miss that revalidates with the origin
    /// (`If-None-Match`), so an unchanged body is not sent again. No
    /// stampede after a purge, at a price: within grace, requests after the
    /// purge may still get the old response, so a write with a soft purge
    /// does not guarantee that its own next read sees it.
    Soft,
}

impl Purge {
    /// `hard` or `soft`: a metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Purge::Hard => "hard",
            Purge::Soft => "soft",
        }
    }
}

/// Which request methods invalidate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum WriteMethods {
    /// Every method but the safe ones (RFC 9110 §9.2.1).
    #[default]
    Unsafe,
    Only(Vec<Method>),
    None,
}

impl WriteMethods {
    pub(crate) fn includes(&self, method: &Method) -> bool {
        match self {
            WriteMethods::Unsafe => !matches!(
                *method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            ),
            WriteMethods::Only(methods) => methods.contains(method),
            WriteMethods::None => false,
        }
    }
}

/// Invalidation settings of a layer.
#[derive(Debug)]
pub(crate) struct InvalidationConfig {
    pub(crate) strategy: PrefixStrategy,
    pub(crate) mode: InvalidationMode,
    pub(crate) methods: WriteMethods,
    /// The bound of each attempt of one target: inline (it goes on past
    /// the write's budget), in the queue, or an
    /// [`Invalidator`](crate::Invalidator) call.
    pub(crate) timeout: Duration,
    /// How long a write's response waits for its inline invalidation (all
    /// its targets); zero while the store's breaker is open.
    pub(crate) write_budget: Duration,
    /// Whether a write to `/` invalidates the whole cache (else `/` only).
    pub(crate) root_prefix: bool,
    pub(crate) queue_capacity: usize,
    pub(crate) max_attempts: u32,
    pub(crate) tag_header: Option<http::HeaderName>,
    /// Whether entries may have tags (a tag header, or a rule's tags):
    /// then leases join the in-flight set that tag invalidations clear.
    pub(crate) tags_in_use: bool,
    /// How a write's invalidation purges: hard (default) or soft.
    pub(crate) purge: Purge,
    /// Whether the tag header leaves the layer (for a CDN in front that
    /// purges by surrogate key) instead of being stripped.
    pub(crate) forward_tags: bool,
    pub(crate) queue: OnceLock<mpsc::Sender<Job>>,
    /// Inline invalidation tasks running now (bounded: past the bound a
    /// write's targets go straight to the queue).
    pub(crate) running: std::sync::atomic::AtomicUsize,
    pub(crate) dead_letters: Mutex<VecDeque<DeadLetter>>,
}

/// What to invalidate. Each removes the rebuild leases of what it selects
/// first, then the entries.
///
/// ```
/// use tower_fence::invalidate::Target;
///
/// let home = Target::Path("/".to_owned());
/// assert_eq!(home.to_string(), "path /");
/// assert_ne!(home, Target::Prefix("/".to_owned()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Target {
    /// A path and every path under it: `/users/42` is `/users/42` (any
    /// query, any variant), `/users/42/posts`, never `/users/420`. `/` is
    /// the whole cache.
    Prefix(String),
    /// Exactly one path, as `Location` and `Content-Location` name it (RFC
    /// 9111 §4.4): all its query strings and variants, nothing under it.
    Path(String),
    /// The entries tagged so.
    Tag(String),
    /// One stored key (see [`FenceLayer::cache_key`](crate::FenceLayer::cache_key)),
    /// every variant of it (when its responses vary) and their leases.
    Key(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Prefix(path) => write!(f, "prefix {path}"),
            Target::Path(path) => write!(f, "path {path}"),
            Target::Tag(tag) => write!(f, "tag {tag}"),
            Target::Key(key) => write!(f, "key {key}"),
        }
    }
}

/// An invalidation that still failed after its last attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// What was to be invalidated.
    pub target: Target,
    /// How.
    pub purge: Purge,
    /// How often it was tried.
    pub attempts: u32,
    /// The last error, as text.
    pub error: String,
}

/// A queued invalidation.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) target: Target,
    pub(crate) purge: Purge,
    pub(crate) attempt: u32,
    /// The debt a write left while this target was not applied: paid when
    /// it is, written off when it is given up.
    pub(crate) debt: Option<crate::owed::Debt>,
}

impl Job {
    /// The first attempt of one target of a write (purged as the layer's
    /// writes purge), owing nothing.
    pub(crate) fn of_write(config: &InvalidationConfig, target: Target) -> Self {
        Job {
            target,
            purge: config.purge,
            attempt: 0,
            debt: None,
        }
    }
}

impl InvalidationConfig {
    /// Whether a request is a write whose success invalidates. gRPC calls
    /// are `POST`s but not writes.
    pub(crate) fn is_write(&self, method: &Method, headers: &HeaderMap) -> bool {
        self.methods.includes(method) && !is_grpc(headers)
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc…`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}
