//! The local tier: a small in-process copy of the hottest records of a
//! shared store, dropped whenever any process changes them.
//!
//! [`Change`] and [`ChangeWatcher`] are how a store tells of changes made
//! by any process (through the Redis stores' fill feed);
//! [`TieredStore`] is the store the layer builds when
//! [`local_tier`](crate::FenceLayerBuilder::local_tier) is set.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::sync::Cache;

use super::{Fill, FillSubscription, HeldRecord, KeyPattern, Store, StoreError, StoreFuture};

/// A change of the records in a store, made by this process or another,
/// as a store's change feed tells it (see [`Store::watch_changes`]).
///
/// Any invalidation (a delete, a prefix or tag invalidation, a soft purge
/// that marks entries stale) and any fill is a change: whoever keeps copies
/// of records must drop the ones a change names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change<'a> {
    /// The record under this key changed: filled, deleted or purged.
    Key(&'a str),
    /// Records under keys not named here changed (a prefix or a tag
    /// invalidation): every copy may be out of date.
    Many,
    /// The feed broke (its connection failed): changes may go unheard
    /// until [`Resumed`](Change::Resumed). Every copy may be out of date.
    Lost,
    /// The feed is read again from a known position: changes from now on
    /// are told. Changes between [`Lost`](Change::Lost) and now may have
    /// been missed.
    Resumed,
}

/// Hears the [`Change`]s of a store; see [`Store::watch_changes`].
///
/// The function returns `false` once it wants no more changes (its owner is
/// gone); the store then forgets it. It runs on the store's feed reader:
/// it must be quick and must not block.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use tower_fence::store::{Change, ChangeWatcher};
///
/// let heard = Arc::new(AtomicUsize::new(0));
/// let count = heard.clone();
/// let watcher = ChangeWatcher::new(move |change| {
///     if let Change::Key(_) = change {
///         count.fetch_add(1, Ordering::Relaxed);
///     }
///     true
/// });
/// assert!(watcher.notify(Change::Key("tf:/a#{1}")));
/// assert_eq!(heard.load(Ordering::Relaxed), 1);
/// ```
#[derive(Clone)]
pub struct ChangeWatcher {
    f: Arc<dyn Fn(Change<'_>) -> bool + Send + Sync>,
}

impl ChangeWatcher {
    /// A watcher calling `f` with each change.
    pub fn new(f: impl Fn(Change<'_>) -> bool + Send + Sync + 'static) -> Self {
        ChangeWatcher { f: Arc::new(f) }
    }

    /// Tells the watcher of `change`; `false` when it wants no more.
    pub fn notify(&self, change: Change<'_>) -> bool {
        (self.f)(change)
    }
}

impl fmt::Debug for ChangeWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeWatcher").finish_non_exhaustive()
    }
}

/// Bytes counted for a local copy besides its key and record.
const COPY_OVERHEAD_BYTES: usize = 96;

/// Stripes of the per-key change counters: a change of one key makes
/// reads of about 1/`STRIPES` of the other keys skip keeping their copy.
const STRIPES: usize = 256;

/// Where the local tier reads the time from, in milliseconds.
pub(crate) type NowMs = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A monotonic clock in milliseconds since the first call.
pub(crate) fn monotonic_ms() -> NowMs {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    Arc::new(|| u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// A store with a local tier: records read from `inner` are kept in process
/// (bounded by bytes, each for at most a TTL) and served from there without
/// a round trip, until a [`Change`] drops them.
///
/// Coherence, honestly:
/// - in this process, every delete, invalidation and fill that goes through
///   this store drops the local copies it touches *before* it returns (and
///   before it starts), so a write's response that left the layer is never
///   followed by a local read of older data;
/// - copies in other processes are dropped when their feed reader reads the
///   change (a round trip or so after the change, while the feed is
///   connected). If a change never reaches a process (the inner store lost
///   it, or it has no change feed), that process may serve its older copy
///   for at most the local TTL. A reader that loses its connection drops
///   every copy and keeps none until it reads the feed again.
///
/// This is weaker than the layer's guarantee "no read older than a
/// completed write" *across* processes, which is why the tier is opt-in.
pub(crate) struct TieredStore<S> {
    inner: S,
    local: Arc<Local>,
}

struct Local {
    copies: Cache<String, Copy>,
    ttl_ms: u64,
    now_ms: NowMs,
    /// Whether copies may be kept: false while the feed is down.
    live: AtomicBool,
    /// Bumped by every change that names no key.
    epoch: AtomicU64,
    /// Bumped by every change of a key of the stripe.
    stripes: Box<[AtomicU64]>,
}

#[derive(Clone)]
struct Copy {
    /// Decoded once when kept, as a [`MemoryStore`](super::MemoryStore)
    /// does.
    record: HeldRecord,
    expires_ms: u64,
}

/// What a read saw of the change counters before it went to the inner
/// store; its copy is kept only if nothing changed since.
#[derive(PartialEq, Eq, Clone, Copy)]
struct Stamp {
    epoch: u64,
    stripe: u64,
}

impl Local {
    fn stripe(key: &str) -> usize {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() as usize) % STRIPES
    }

    fn stamp(&self, stripe: usize) -> Stamp {
        Stamp {
            epoch: self.epoch.load(Ordering::SeqCst),
            stripe: self.stripes[stripe].load(Ordering::SeqCst),
        }
    }

    /// Drops the copy of `key`; counted first, so that a read racing with
    /// it does not keep what it read.
    fn drop_key(&self, key: &str) {
        self.stripes[Self::stripe(key)].fetch_add(1, Ordering::SeqCst);
        self.copies.invalidate(key);
    }

    /// Drops every copy; counted first, as in [`drop_key`](Self::drop_key).
    fn drop_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.copies.invalidate_all();
    }

    fn hear(&self, change: Change<'_>) {
        match change {
            Change::Key(key) => self.drop_key(key),
            Change::Many => self.drop_all(),
            Change::Lost => {
                self.live.store(false, Ordering::SeqCst);
                self.drop_all();
            }
            Change::Resumed => {
                self.drop_all();
                self.live.store(true, Ordering::SeqCst);
            }
        }
    }

    fn get(&self, key: &str) -> Option<HeldRecord> {
        let copy = self.copies.get(key)?;
        if (self.now_ms)() < copy.expires_ms {
            Some(copy.record)
        } else {
            self.copies.invalidate(key);
            None
        }
    }

    /// Keeps a copy of `record`, read from the inner store after `stamp`,
    /// unless a change came in between.
    fn keep(&self, key: &str, record: &Bytes, stripe: usize, stamp: Stamp) {
        if !self.live.load(Ordering::SeqCst) || self.stamp(stripe) != stamp {
            return;
        }
        let copy = Copy {
            record: HeldRecord::decoding(key, record.clone()),
            expires_ms: (self.now_ms)().saturating_add(self.ttl_ms),
        };
        self.copies.insert(key.to_owned(), copy);
        // A change between the check above and the insert bumped a counter
        // before dropping copies: seen here, the copy goes.
        if !self.live.load(Ordering::SeqCst) || self.stamp(stripe) != stamp {
            self.copies.invalidate(key);
        }
    }
}

/// Drops the local copies a change touches when it is dropped: at the end
/// of the inner store's call, or when the call is cancelled (a timeout).
struct DropAfter<'a> {
    local: &'a Local,
    key: Option<&'a str>,
}

impl Drop for DropAfter<'_> {
    fn drop(&mut self) {
        match self.key {
            Some(key) => self.local.drop_key(key),
            None => self.local.drop_all(),
        }
    }
}

impl<S: Store> TieredStore<S> {
    /// A local tier of at most `capacity_bytes` (keys, records and some
    /// overhead) in front of `inner`, each copy kept at most `ttl` as
    /// `now_ms` counts.
    pub(crate) fn new(inner: S, capacity_bytes: u64, ttl: Duration, now_ms: NowMs) -> Self {
        let copies = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|key: &String, copy: &Copy| {
                u32::try_from(key.len() + copy.record.weight() + COPY_OVERHEAD_BYTES)
                    .unwrap_or(u32::MAX)
            })
            // The TTL as `now_ms` counts is checked on each read; this
            // frees memory on real time when a test clock stands still.
            .time_to_live(ttl.max(Duration::from_millis(1)))
            .build();
        let local = Arc::new(Local {
            copies,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            now_ms,
            live: AtomicBool::new(true),
            epoch: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
        });
        // A store with a change feed: no copies until the feed is read (it
        // says so with `Resumed`, at once when it is read already).
        local.live.store(false, Ordering::SeqCst);
        let weak = Arc::downgrade(&local);
        let watched = inner.watch_changes(ChangeWatcher::new(move |change| {
            weak.upgrade().map(|local| local.hear(change)).is_some()
        }));
        if !watched {
            // Nothing tells of other processes' changes: the TTL alone
            // bounds how stale a copy gets.
            local.live.store(true, Ordering::SeqCst);
        }
        TieredStore { inner, local }
    }

    /// Runs a call that changes `key` (every key when `None`): the local
    /// copies it touches are dropped before the call is made and again
    /// when it ends or is cancelled (see [`DropAfter`]).
    fn changing<'a, T: 'a>(
        &'a self,
        key: Option<&'a str>,
        call: impl FnOnce() -> StoreFuture<'a, T>,
    ) -> StoreFuture<'a, T> {
        match key {
            Some(key) => self.local.drop_key(key),
            None => self.local.drop_all(),
        }
        let call = call();
        Box::pin(async move {
            let _after = DropAfter {
                local: &self.local,
                key,
            };
            call.await
        })
    }
}

impl<S> fmt::Debug for TieredStore<S>
where
    S: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TieredStore")
            .field("inner", &self.inner)
            .field("local_bytes", &self.local.copies.weighted_size())
            .field("local_ttl_ms", &self.local.ttl_ms)
            .field("live", &self.local.live.load(Ordering::Relaxed))
            .finish()
    }
}

impl<S: Store> Store for TieredStore<S> {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        if let Some(record) = self.local.get(key) {
            return Box::pin(std::future::ready(Ok(Some(record.into_bytes()))));
        }
        let stripe = Local::stripe(key);
        let stamp = self.local.stamp(stripe);
        Box::pin(async move {
            let record = self.inner.get(key).await?;
            if let Some(record) = &record {
                self.local.keep(key, record, stripe, stamp);
            }
            Ok(record)
        })
    }

    /// A copy in the local tier at once; else what the inner store can
    /// say at once.
    fn get_now(&self, key: &str) -> Option<Result<Option<Bytes>, StoreError>> {
        match self.local.get(key) {
            Some(record) => Some(Ok(Some(record.into_bytes()))),
            None => self.inner.get_now(key),
        }
    }

    /// [`get_now`](Self::get_now), with a local copy as it was decoded
    /// when kept.
    fn get_held_now(&self, key: &str) -> Option<Result<Option<HeldRecord>, StoreError>> {
        match self.local.get(key) {
            Some(record) => Some(Ok(Some(record))),
            None => self.inner.get_held_now(key),
        }
    }

    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        self.changing(Some(key), || self.inner.put(key, record, ttl))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.changing(Some(key), || self.inner.delete(key))
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
        sets: &'a [String],
    ) -> StoreFuture<'a, bool> {
        self.inner.try_lease(key, token, ttl, sets)
    }

    fn extend_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        self.inner.extend_lease(key, token, ttl)
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        self.inner.release_lease(key, token)
    }

    fn fill<'a>(&'a self, fill: Fill<'a>) -> StoreFuture<'a, bool> {
        let key = fill.key;
        self.changing(Some(key), || self.inner.fill(fill))
    }

    fn subscribe_fill(&self, key: &str) -> Option<FillSubscription> {
        self.inner.subscribe_fill(key)
    }

    fn watch_changes(&self, watcher: ChangeWatcher) -> bool {
        self.inner.watch_changes(watcher)
    }

    fn reconnect(&self) {
        // The store was sick: what was read before may have missed changes.
        self.local.drop_all();
        self.inner.reconnect();
    }

    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        self.changing(None, || self.inner.delete_matching(pattern))
    }

    fn delete_members<'a>(&'a self, set: &'a str) -> StoreFuture<'a, u64> {
        self.changing(None, || self.inner.delete_members(set))
    }

    fn delete_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
    ) -> StoreFuture<'a, u64> {
        self.changing(None, || self.inner.delete_members_matching(set, pattern))
    }

    fn mark_stale<'a>(&'a self, key: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        self.changing(Some(key), || self.inner.mark_stale(key, at_ms))
    }

    fn mark_stale_matching<'a>(
        &'a self,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        self.changing(None, || self.inner.mark_stale_matching(pattern, at_ms))
    }

    fn mark_stale_members<'a>(&'a self, set: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        self.changing(None, || self.inner.mark_stale_members(set, at_ms))
    }

    fn mark_stale_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        self.changing(None, || {
            self.inner.mark_stale_members_matching(set, pattern, at_ms)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use super::*;
    use crate::store::MemoryStore;

    /// A store that counts its reads and can hold one read mid-way.
    #[derive(Debug, Clone)]
    struct Counting {
        inner: MemoryStore,
        gets: Arc<AtomicUsize>,
        watchers: Arc<Mutex<Vec<ChangeWatcher>>>,
        gate: Arc<tokio::sync::Mutex<()>>,
    }

    impl Counting {
        fn new() -> Self {
            Counting {
                inner: MemoryStore::new(1 << 20),
                gets: Arc::new(AtomicUsize::new(0)),
                watchers: Arc::new(Mutex::new(Vec::new())),
                gate: Arc::new(tokio::sync::Mutex::new(())),
            }
        }

        fn tell(&self, change: Change<'_>) {
            for w in self.watchers.lock().unwrap().iter() {
                w.notify(change);
            }
        }
    }

    impl Store for Counting {
        fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
            Box::pin(async move {
                self.gets.fetch_add(1, Ordering::SeqCst);
                let record = self.inner.get(key).await;
                let _held = self.gate.lock().await;
                record
            })
        }
        fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
            self.inner.put(key, record, ttl)
        }
        fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
            self.inner.delete(key)
        }
        fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
            self.inner.delete_matching(pattern)
        }
        fn watch_changes(&self, watcher: ChangeWatcher) -> bool {
            watcher.notify(Change::Resumed);
            self.watchers.lock().unwrap().push(watcher);
            true
        }
    }

    fn manual() -> (NowMs, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(0));
        let read = now.clone();
        (Arc::new(move || read.load(Ordering::SeqCst)), now)
    }

    const TTL: Duration = Duration::from_secs(5);

    /// A tier over a counting store that holds `k` = `v1`, and its clock.
    async fn tier_over_k_v1() -> (Counting, TieredStore<Counting>, Arc<AtomicU64>) {
        let inner = Counting::new();
        let (now_ms, now) = manual();
        let tier = TieredStore::new(inner.clone(), 1 << 20, TTL, now_ms);
        inner
            .put("k", Bytes::from_static(b"v1"), TTL * 10)
            .await
            .unwrap();
        (inner, tier, now)
    }

    #[tokio::test]
    async fn second_read_is_local_until_the_ttl() {
        let (inner, tier, now) = tier_over_k_v1().await;
        assert_eq!(tier.get("k").await.unwrap().unwrap(), "v1");
        assert_eq!(tier.get("k").await.unwrap().unwrap(), "v1");
        assert_eq!(inner.gets.load(Ordering::SeqCst), 1);
        // Changed behind the tier's back (a lost change): the copy stays
        // until the TTL, not longer.
        inner
            .put("k", Bytes::from_static(b"v2"), TTL * 10)
            .await
            .unwrap();
        now.store(4_999, Ordering::SeqCst);
        assert_eq!(tier.get("k").await.unwrap().unwrap(), "v1");
        now.store(5_000, Ordering::SeqCst);
        assert_eq!(tier.get("k").await.unwrap().unwrap(), "v2");
        assert_eq!(inner.gets.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn get_now_answers_from_the_local_copy_only() {
        let (inner, tier, now) = tier_over_k_v1().await;
        // No copy yet, and the inner store cannot answer at once.
        assert!(tier.get_now("k").is_none());
        assert_eq!(tier.get("k").await.unwrap().unwrap(), "v1");
        let copy = tier.get_now("k").expect("the local copy").unwrap();
        assert_eq!(copy.unwrap(), "v1");
        assert_eq!(inner.gets.load(Ordering::SeqCst), 1);
        // A change through the tier drops the copy.
        tier.put("k", Bytes::from_static(b"v2"), TTL * 10)
            .await
            .unwrap();
        assert!(tier.get_now("k").is_none());
        assert_eq!(tier.get("k").await.unwrap().unwrap(), "v2");
        assert!(tier.get_now("k").is_some());
        // Past the local TTL the copy is not answered.
        now.store(TTL.as_millis() as u64, Ordering::SeqCst);
        assert!(tier.get_now("k").is_none());
    }

    #[tokio::test]
    async fn changes_drop_copies() {
        let inner = Counting::new();
        let (now_ms, _now) = manual();
        let tier = TieredStore::new(inner.clone(), 1 << 20, TTL, now_ms);
        for (key, change) in [
            ("a", Change::Key("a")),
            ("b", Change::Many),
            ("c", Change::Lost),
        ] {
            inner
                .put(key, Bytes::from_static(b"v1"), TTL)
                .await
                .unwrap();
            assert_eq!(tier.get(key).await.unwrap().unwrap(), "v1");
            inner
                .put(key, Bytes::from_static(b"v2"), TTL)
                .await
                .unwrap();
            assert_eq!(tier.get(key).await.unwrap().unwrap(), "v1");
            inner.tell(change);
            assert_eq!(tier.get(key).await.unwrap().unwrap(), "v2", "{change:?}");
        }
        // After `Lost`, nothing is kept until `Resumed`.
        let before = inner.gets.load(Ordering::SeqCst);
        tier.get("c").await.unwrap();
        assert_eq!(inner.gets.load(Ordering::SeqCst), before + 1);
        inner.tell(Change::Resumed);
        tier.get("c").await.unwrap();
        tier.get("c").await.unwrap();
        assert_eq!(inner.gets.load(Ordering::SeqCst), before + 2);
    }

    #[tokio::test]
    async fn own_writes_drop_copies_before_they_return() {
        let inner = Counting::new();
        let (now_ms, _now) = manual();
        let tier = TieredStore::new(inner.clone(), 1 << 20, TTL, now_ms);
        inner
            .put("tf:/a#{1}", Bytes::from_static(b"v1"), TTL)
            .await
            .unwrap();
        tier.get("tf:/a#{1}").await.unwrap();
        let fill = Fill::new("tf:/a#{1}", Bytes::from_static(b"v2"), TTL);
        assert!(tier.fill(fill).await.unwrap());
        assert_eq!(tier.get("tf:/a#{1}").await.unwrap().unwrap(), "v2");
        tier.delete_matching(&KeyPattern::prefix("tf:", "/a"))
            .await
            .unwrap();
        assert_eq!(tier.get("tf:/a#{1}").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_read_racing_a_change_keeps_no_copy() {
        let inner = Counting::new();
        let (now_ms, _now) = manual();
        let tier = Arc::new(TieredStore::new(inner.clone(), 1 << 20, TTL, now_ms));
        inner
            .put("k", Bytes::from_static(b"v1"), TTL)
            .await
            .unwrap();
        // The read has its record (v1) but is held before it returns.
        let gate = inner.gate.clone().lock_owned().await;
        let reader = tokio::spawn({
            let tier = tier.clone();
            async move { tier.get("k").await.unwrap() }
        });
        while inner.gets.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        inner
            .put("k", Bytes::from_static(b"v2"), TTL)
            .await
            .unwrap();
        inner.tell(Change::Key("k"));
        drop(gate);
        assert_eq!(reader.await.unwrap().unwrap(), "v1");
        // The v1 it read is not kept: the next read goes to the store.
        assert_eq!(tier.get("k").await.unwrap().unwrap(), "v2");
    }

    #[test]
    fn bounded_by_bytes() {
        let (now_ms, _now) = manual();
        let tier = TieredStore::new(MemoryStore::new(1 << 20), 64 * 1024, TTL, now_ms);
        let record = Bytes::from(vec![0u8; 1024]);
        for i in 0..1_000 {
            tier.local.copies.insert(
                format!("k{i}"),
                Copy {
                    record: HeldRecord::new(record.clone()),
                    expires_ms: u64::MAX,
                },
            );
        }
        tier.local.copies.run_pending_tasks();
        assert!(tier.local.copies.weighted_size() <= 64 * 1024);
    }
}
