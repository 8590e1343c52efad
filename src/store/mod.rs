//! Where entries live: the [`Store`] trait and its implementations.
//!
//! A store keeps opaque records (encoded entries) under string keys, each
//! with a time to live. The layer derives the keys, encodes and decodes the
//! records and bounds every call with its store timeout; a store only moves
//! bytes.
//!
//! - [`MemoryStore`]: in process, bounded by bytes (the default).
//! - [`RedisStore`]: a `bb8` pool of `bb8-redis` connections, shared by every
//!   instance of an app (feature `redis`, on by default).
//!
//! Implement [`Store`] to put entries elsewhere. The methods return boxed
//! futures so that the layer can hold any store as `Arc<dyn Store>`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use crate::error::StoreError;
pub use crate::key::{lease_key, KeyPattern};

mod held;
pub use held::HeldRecord;

mod memory;
pub use memory::{MemoryStore, DEFAULT_MEMORY_CAPACITY_BYTES};

mod tiered;
pub(crate) use tiered::{monotonic_ms, NowMs, TieredStore};
pub use tiered::{Change, ChangeWatcher};

#[cfg(feature = "redis")]
mod feed;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod removal;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisPool, RedisStore, DEFAULT_FILL_FEED_KEY};

#[cfg(feature = "cluster")]
mod cluster;
#[cfg(feature = "cluster")]
#[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
pub use self::cluster::RedisClusterStore;

/// The future a [`Store`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A place to keep cached records.
///
/// Records are opaque bytes; keys are the layer's (see the crate docs for
/// their shape). Implementations must be cheap to call concurrently: the
/// layer shares one store between every service it makes. Only `get`, `put`
/// and `delete` are required; the rest have defaults that work in one
/// process without coordination, and stores shared by a fleet override
/// them.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use tower_fence::store::{MemoryStore, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_fence::store::StoreError> {
/// let store = MemoryStore::new(1 << 20);
/// store.put("k", Bytes::from_static(b"v"), Duration::from_secs(5)).await?;
/// assert_eq!(store.get("k").await?, Some(Bytes::from_static(b"v")));
/// store.delete("k").await?;
/// assert_eq!(store.get("k").await?, None);
/// # Ok(())
/// # }
/// ```
pub trait Store: fmt::Debug + Send + Sync + 'static {
    /// Reads the record under `key`; `None` when there is none (or it
    /// expired). One round trip on a remote store.
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>>;

    /// Answers [`get`](Self::get) at once when this store can without
    /// waiting (it holds the answer in this process); `None` when the
    /// answer needs [`get`](Self::get). A hit on such a store then costs
    /// no future and no task switch. The answer must be the one `get`
    /// would give now. The default is `None`: every read goes through
    /// `get`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use tower_fence::store::{MemoryStore, Store};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fence::store::StoreError> {
    /// let store = MemoryStore::new(1 << 20);
    /// store.put("k", Bytes::from_static(b"v"), Duration::from_secs(5)).await?;
    /// // An in-memory store always knows at once.
    /// assert_eq!(store.get_now("k").transpose()?, Some(Some(Bytes::from_static(b"v"))));
    /// assert_eq!(store.get_now("gone").transpose()?, Some(None));
    /// # Ok(())
    /// # }
    /// ```
    fn get_now(&self, key: &str) -> Option<Result<Option<Bytes>, StoreError>> {
        let _ = key;
        None
    }

    /// [`get_now`](Self::get_now), with the record as this store holds it
    /// ([`HeldRecord`]): the layer reads through this method. The stores of
    /// this crate that keep records in process answer with the record
    /// decoded when it was stored, so that a hit decodes nothing. The
    /// default answers with [`get_now`](Self::get_now)'s bytes alone, which
    /// is right for every other store.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use tower_fence::store::{MemoryStore, Store};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fence::store::StoreError> {
    /// let store = MemoryStore::new(1 << 20);
    /// store.put("k", Bytes::from_static(b"v"), Duration::from_secs(5)).await?;
    /// let held = store.get_held_now("k").transpose()?.flatten();
    /// assert_eq!(held.map(|h| h.into_bytes()), Some(Bytes::from_static(b"v")));
    /// # Ok(())
    /// # }
    /// ```
    fn get_held_now(&self, key: &str) -> Option<Result<Option<HeldRecord>, StoreError>> {
        self.get_now(key)
            .map(|result| result.map(|record| record.map(HeldRecord::new)))
    }

    /// Stores `record` under `key`, replacing what was there, for `ttl`.
    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()>;

    /// Removes the record under `key`, and its rebuild lease, if any.
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;

    /// Takes the rebuild lease of `key` for `ttl`, unless someone holds it:
    /// `true` when `token` now holds it. The lease is what makes one request
    /// in the whole fleet rebuild a key while the others wait. The lease
    /// joins `sets` (the index sets of [`Fill::sets`]) so that an
    /// invalidation through them finds it.
    ///
    /// The default has no cross-process coordination and always grants the
    /// lease (the in-process single flight still applies).
    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
        sets: &'a [String],
    ) -> StoreFuture<'a, bool> {
        let _ = (key, token, ttl, sets);
        Box::pin(std::future::ready(Ok(true)))
    }

    /// Extends the lease of `key` to `ttl` from now if `token` still holds
    /// it; `false` when it does not (it expired, or an invalidation took it).
    fn extend_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let _ = (key, token, ttl);
        Box::pin(std::future::ready(Ok(true)))
    }

    /// Releases the lease of `key` if `token` holds it (compare and delete).
    fn release_lease<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        let _ = (key, token);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Stores a rebuilt entry, all at once: only while `fill.token` holds
    /// the lease of the key (when a token is given), then releases the
    /// lease, adds the key to `fill.sets` (tags, prefix indexes) and tells
    /// waiting processes that the key was filled. `false` when the lease was
    /// lost and nothing was stored: an invalidation removed it during the
    /// rebuild, so the rebuilt value may be stale already.
    ///
    /// The default ignores the lease and the sets and calls
    /// [`put`](Store::put).
    fn fill<'a>(&'a self, fill: Fill<'a>) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.put(fill.key, fill.record, fill.ttl).await?;
            Ok(true)
        })
    }

    /// A subscription that wakes when another process fills `key` (see
    /// [`fill`](Store::fill)). `None` when the store has no such
    /// notifications: waiters then poll.
    fn subscribe_fill(&self, key: &str) -> Option<FillSubscription> {
        let _ = key;
        None
    }

    /// Tells `watcher` of every [`Change`] any process makes to the
    /// records from now on (fills, deletes, invalidations), as the store's
    /// change feed carries them, and of the feed breaking
    /// ([`Change::Lost`]) and being read again ([`Change::Resumed`]; at once
    /// when it is read already). `false` when the store has no such feed:
    /// the local tier then relies on its TTL alone. The Redis stores carry
    /// changes on their fill feed. A store that marks entries stale must
    /// publish that as a change too.
    ///
    /// The default has no feed and returns `false`.
    fn watch_changes(&self, watcher: ChangeWatcher) -> bool {
        let _ = watcher;
        false
    }

    /// Drops connections that may be dead: called by the layer when its
    /// circuit breaker opens after repeated timeouts or connection errors,
    /// so that a half-open connection (a failover without a reset) is not
    /// used again. The next call connects afresh. The default does nothing.
    fn reconnect(&self) {}

    /// Deletes every key `pattern` selects (entries and their leases)
    /// without blocking the store: on Redis `SCAN MATCH … COUNT …` and
    /// `UNLINK` in batches, never `KEYS`. Returns how many were deleted.
    ///
    /// The default deletes nothing and says so with an error.
    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        let _ = pattern;
        Box::pin(std::future::ready(Err(StoreError::backend(
            "this store cannot delete by pattern",
        ))))
    }

    /// Deletes every key that is a member of the set `set` (joined through
    /// [`Fill::sets`] or [`try_lease`](Store::try_lease)), then the set,
    /// reading it incrementally (`SSCAN`). Returns how many were deleted.
    ///
    /// The default deletes nothing and says so with an error.
    fn delete_members<'a>(&'a self, set: &'a str) -> StoreFuture<'a, u64> {
        let _ = set;
        Box::pin(std::future::ready(Err(StoreError::backend(
            "this store has no sets",
        ))))
    }

    /// Deletes the members of the set `set` that `pattern` selects (entries
    /// and leases) and removes them from the set, reading it incrementally
    /// (`SSCAN`); the other members stay, and so does the set. Returns how
    /// many were deleted. The indexed prefix strategy invalidates one path
    /// (a `Location`) or one key and its variants so: through the index set
    /// of the path, without a walk of the keyspace.
    ///
    /// The default deletes what `pattern` selects with
    /// [`delete_matching`](Store::delete_matching), which selects the same
    /// keys.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use tower_fence::store::{Fill, KeyPattern, MemoryStore, Store};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fence::StoreError> {
    /// let store = MemoryStore::new(1 << 20);
    /// let sets = vec!["tf:idx:/a".to_owned()];
    /// for key in ["tf:/a#{1}", "tf:/a/b#{2}"] {
    ///     let fill = Fill::new(key, Bytes::from_static(b"x"), Duration::from_secs(60));
    ///     store.fill(fill.joining(&sets)).await?;
    /// }
    /// let only_a = KeyPattern::path("tf:", "/a");
    /// assert_eq!(store.delete_members_matching("tf:idx:/a", &only_a).await?, 1);
    /// assert!(store.get("tf:/a#{1}").await?.is_none());
    /// assert!(store.get("tf:/a/b#{2}").await?.is_some());
    /// # Ok(())
    /// # }
    /// ```
    fn delete_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
    ) -> StoreFuture<'a, u64> {
        let _ = set;
        self.delete_matching(pattern)
    }

    /// Soft purge of one key: marks the entry under `key` stale from
    /// `at_ms` (ms since the Unix epoch) on, in place, keeping how long it
    /// may still be served stale or validated and its time to live, and
    /// removes the key's rebuild lease. A vary stub, a record of another
    /// codec version, or an entry stale by then is left as it is. Returns
    /// how many keys changed.
    ///
    /// The default deletes the key instead ([`delete`](Store::delete)): a
    /// store that cannot rewrite records purges hard, which is always
    /// safe.
    fn mark_stale<'a>(&'a self, key: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        let _ = at_ms;
        Box::pin(async move {
            self.delete(key).await?;
            Ok(1)
        })
    }

    /// Soft purge by pattern: what [`delete_matching`](Store::delete_matching)
    /// selects, leases deleted (first), entries marked stale from `at_ms`
    /// on as [`mark_stale`](Store::mark_stale) does. Returns how many keys
    /// changed.
    ///
    /// The default deletes them ([`delete_matching`](Store::delete_matching)).
    fn mark_stale_matching<'a>(
        &'a self,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        let _ = at_ms;
        self.delete_matching(pattern)
    }

    /// Soft purge through a set: its leases deleted and removed from it,
    /// its entries marked stale from `at_ms` on (they stay members, so a
    /// later purge still finds them). Returns how many keys changed.
    ///
    /// The default deletes them ([`delete_members`](Store::delete_members)).
    fn mark_stale_members<'a>(&'a self, set: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        let _ = at_ms;
        self.delete_members(set)
    }

    /// [`mark_stale_members`](Store::mark_stale_members) for the members
    /// `pattern` selects.
    ///
    /// The default deletes them
    /// ([`delete_members_matching`](Store::delete_members_matching)).
    fn mark_stale_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        let _ = at_ms;
        self.delete_members_matching(set, pattern)
    }
}

/// A rebuilt entry to store; see [`Store::fill`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Fill<'a> {
    /// The entry's key.
    pub key: &'a str,
    /// The encoded entry.
    pub record: Bytes,
    /// How long to keep it.
    pub ttl: Duration,
    /// The lease token the rebuild holds; `None` stores unconditionally.
    pub token: Option<&'a str>,
    /// The key whose lease fences the fill: `key` itself, or the key of a
    /// *permit* (a lease of its own that a request which rebuilt the entry
    /// without leading its flight took before calling the origin). Use
    /// [`fence_key`](Self::fence_key) to read it.
    pub lease_of: Option<&'a str>,
    /// Sets the key joins: its tags' sets and, with the indexed prefix
    /// strategy, the index sets of its path and the path's ancestors. Each
    /// set is kept at least as long as the entry.
    pub sets: &'a [String],
}

impl<'a> Fill<'a> {
    /// A fill of `record` under `key` for `ttl`, unfenced, joining no set.
    pub fn new(key: &'a str, record: Bytes, ttl: Duration) -> Self {
        Fill {
            key,
            record,
            ttl,
            token: None,
            lease_of: None,
            sets: &[],
        }
    }

    /// The key whose lease fences this fill.
    pub fn fence_key(&self) -> &'a str {
        self.lease_of.unwrap_or(self.key)
    }

    /// Fences the fill by the lease of another key (a permit) that `token`
    /// holds.
    pub fn fenced_by_lease_of(mut self, key: &'a str, token: &'a str) -> Self {
        self.lease_of = Some(key);
        self.token = Some(token);
        self
    }

    /// Fences the fill by the lease `token` holds.
    pub fn fenced_by(mut self, token: &'a str) -> Self {
        self.token = Some(token);
        self
    }

    /// Adds the key to `sets`.
    pub fn joining(mut self, sets: &'a [String]) -> Self {
        self.sets = sets;
        self
    }
}

/// Wakes a waiter when a key it waits for was filled by another process.
///
/// Made from a [`tokio::sync::watch`] receiver whose value the store bumps
/// on each fill of the key.
#[derive(Debug)]
pub struct FillSubscription {
    rx: tokio::sync::watch::Receiver<u64>,
}

impl FillSubscription {
    /// A subscription woken by changes of `rx`'s value.
    pub fn new(mut rx: tokio::sync::watch::Receiver<u64>) -> Self {
        rx.mark_unchanged();
        FillSubscription { rx }
    }

    /// Resolves at the next fill after the subscription was made (or after
    /// the previous call resolved). Never resolves once the store stopped
    /// sending: callers bound their wait.
    pub async fn filled(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl<T: Store + ?Sized> Store for Arc<T> {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        (**self).get(key)
    }

    fn get_now(&self, key: &str) -> Option<Result<Option<Bytes>, StoreError>> {
        (**self).get_now(key)
    }

    fn get_held_now(&self, key: &str) -> Option<Result<Option<HeldRecord>, StoreError>> {
        (**self).get_held_now(key)
    }

    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        (**self).put(key, record, ttl)
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        (**self).delete(key)
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
        sets: &'a [String],
    ) -> StoreFuture<'a, bool> {
        (**self).try_lease(key, token, ttl, sets)
    }

    fn extend_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        (**self).extend_lease(key, token, ttl)
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        (**self).release_lease(key, token)
    }

    fn fill<'a>(&'a self, fill: Fill<'a>) -> StoreFuture<'a, bool> {
        (**self).fill(fill)
    }

    fn subscribe_fill(&self, key: &str) -> Option<FillSubscription> {
        (**self).subscribe_fill(key)
    }

    fn watch_changes(&self, watcher: ChangeWatcher) -> bool {
        (**self).watch_changes(watcher)
    }

    fn reconnect(&self) {
        (**self).reconnect();
    }

    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        (**self).delete_matching(pattern)
    }

    fn delete_members<'a>(&'a self, set: &'a str) -> StoreFuture<'a, u64> {
        (**self).delete_members(set)
    }

    fn delete_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
    ) -> StoreFuture<'a, u64> {
        (**self).delete_members_matching(set, pattern)
    }

    fn mark_stale<'a>(&'a self, key: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        (**self).mark_stale(key, at_ms)
    }

    fn mark_stale_matching<'a>(
        &'a self,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        (**self).mark_stale_matching(pattern, at_ms)
    }

    fn mark_stale_members<'a>(&'a self, set: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        (**self).mark_stale_members(set, at_ms)
    }

    fn mark_stale_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        (**self).mark_stale_members_matching(set, pattern, at_ms)
    }
}
