//! The in-process store.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache;
use moka::Expiry;

use super::{Fill, HeldRecord, KeyPattern, Store, StoreError, StoreFuture};

/// Bytes counted for an entry besides its key and record (moka's own
/// bookkeeping, roughly).
const ENTRY_OVERHEAD_BYTES: usize = 96;

/// Default capacity of [`MemoryStore::default`]: 64 MiB.
pub const DEFAULT_MEMORY_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

/// An in-process store bounded by the total size of its keys and records,
/// with a time to live per record. Backed by [moka] (TinyLFU admission, LRU
/// eviction); entries are not shared between processes.
///
/// A record the layer wrote is decoded once, when it is stored, and a hit
/// copies that decoded response ([`HeldRecord`]); what the decoded form
/// adds (about 128 bytes per header field, the values' bytes shared with
/// the record) counts against the capacity too.
///
/// [moka]: https://docs.rs/moka
///
/// Rebuild leases are kept in process too, with the same semantics as in
/// Redis: a fenced fill stores only while its lease is held.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<String, Record>,
    capacity_bytes: u64,
    meta: Arc<Mutex<Meta>>,
}

/// Leases and sets, under one lock so that a fenced fill and an
/// invalidation never interleave.
#[derive(Debug, Default)]
struct Meta {
    leases: HashMap<String, Lease>,
    sets: HashMap<String, HashSet<String>>,
}

#[derive(Debug)]
struct Lease {
    token: String,
    expires: Instant,
}

impl Lease {
    fn held_by(&self, token: &str, now: Instant) -> bool {
        self.token == token && now < self.expires
    }
}

/// Expired leases are swept when the table grows past this.
const LEASE_SWEEP_THRESHOLD: usize = 1024;

/// Set members of vanished entries are swept when the sets hold more.
const SET_SWEEP_THRESHOLD: usize = 100_000;

#[derive(Clone)]
struct Record {
    /// The bytes, decoded once when stored (a hit copies the decoded
    /// response instead of decoding it again).
    held: HeldRecord,
    ttl: Duration,
    /// A rewrite of the record it replaces (a soft purge): it keeps that
    /// record's expiry instead of starting `ttl` afresh.
    keeps_expiry: bool,
}

struct PerRecordTtl;

impl Expiry<String, Record> for PerRecordTtl {
    fn expire_after_create(&self, _: &String, record: &Record, _: Instant) -> Option<Duration> {
        Some(record.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        record: &Record,
        _: Instant,
        current: Option<Duration>,
    ) -> Option<Duration> {
        if record.keeps_expiry {
            return current;
        }
        Some(record.ttl)
    }
}

impl MemoryStore {
    /// A store holding at most `capacity_bytes` of keys and records (plus a
    /// small per-entry overhead); the least recently used go first.
    pub fn new(capacity_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|key: &String, record: &Record| {
                let weight = key.len() + record.held.weight() + ENTRY_OVERHEAD_BYTES;
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .expire_after(PerRecordTtl)
            .build();
        MemoryStore {
            cache,
            capacity_bytes,
            meta: Arc::new(Mutex::new(Meta::default())),
        }
    }

    /// The configured capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes held now (keys, records, their decoded forms and overhead),
    /// after pending evictions have run.
    pub fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }

    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        // Nothing is left half-done under this lock: recover from poison.
        self.meta
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets set members whose entries are gone, once the sets grow.
    fn sweep_sets(&self, meta: &mut Meta) {
        let members: usize = meta.sets.values().map(HashSet::len).sum();
        if members <= SET_SWEEP_THRESHOLD {
            return;
        }
        let Meta { leases, sets } = meta;
        for set in sets.values_mut() {
            set.retain(|member| match member.strip_suffix(":lease") {
                Some(key) => leases.contains_key(key),
                None => self.cache.contains_key(member),
            });
        }
        sets.retain(|_, set| !set.is_empty());
    }

    /// Removes the entries among `members` (not their leases); returns how
    /// many there were.
    fn delete_entries(&self, members: &HashSet<String>) -> u64 {
        let mut deleted = 0;
        for member in members.iter().filter(|m| !m.ends_with(":lease")) {
            if self.cache.contains_key(member) {
                deleted += 1;
            }
            self.cache.invalidate(member);
        }
        deleted
    }

    /// Soft purge: marks the entries among `keys` (leases are skipped)
    /// stale from `at_ms` on, each in one atomic step against concurrent
    /// fills. Returns how many changed.
    fn mark_entries_stale<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k String>,
        at_ms: u64,
    ) -> u64 {
        let mut marked = 0;
        for key in keys {
            if !key.ends_with(":lease") && self.mark_entry_stale(key, at_ms) {
                marked += 1;
            }
        }
        marked
    }

    fn mark_entry_stale(&self, key: &str, at_ms: u64) -> bool {
        let result = self.cache.entry_by_ref(key).and_compute_with(|current| {
            let Some(current) = current else {
                return Op::Nop;
            };
            let record = current.value();
            match crate::entry::mark_stale_record(record.held.bytes(), key, at_ms) {
                Some(bytes) => Op::Put(Record {
                    held: HeldRecord::decoding(key, bytes),
                    ttl: record.ttl,
                    keeps_expiry: true,
                }),
                None => Op::Nop,
            }
        });
        matches!(result, CompResult::ReplacedWith(_))
    }

    /// Removes the leases `pattern` selects (first: a rebuild under it can
    /// no longer store) and returns how many there were, with the keys of
    /// the records it selects.
    fn select(&self, pattern: &KeyPattern) -> (u64, Vec<String>) {
        let leases = {
            let mut meta = self.meta();
            let before = meta.leases.len();
            meta.leases
                .retain(|key, _| !pattern.matches(&super::lease_key(key)));
            (before - meta.leases.len()) as u64
        };
        let keys = self
            .cache
            .iter()
            .filter(|(key, _)| pattern.matches(key))
            .map(|(key, _)| String::clone(&key))
            .collect();
        (leases, keys)
    }

    /// Removes the leases among `members` and returns how many there were.
    fn remove_leases<'k>(meta: &mut Meta, members: impl IntoIterator<Item = &'k String>) -> u64 {
        let mut removed = 0;
        for member in members {
            if let Some(key) = member.strip_suffix(":lease") {
                if meta.leases.remove(key).is_some() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The record under `key`, if any.
    fn record(&self, key: &str) -> Option<HeldRecord> {
        self.cache.get(key).map(|record| record.held)
    }

    /// Number of records held now, after pending evictions have run.
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

impl Default for MemoryStore {
    /// A store of [`DEFAULT_MEMORY_CAPACITY_BYTES`] (64 MiB).
    fn default() -> Self {
        MemoryStore::new(DEFAULT_MEMORY_CAPACITY_BYTES)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity_bytes", &self.capacity_bytes)
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        Box::pin(std::future::ready(Ok(self
            .record(key)
            .map(HeldRecord::into_bytes))))
    }

    fn get_now(&self, key: &str) -> Option<Result<Option<Bytes>, StoreError>> {
        Some(Ok(self.record(key).map(HeldRecord::into_bytes)))
    }

    fn get_held_now(&self, key: &str) -> Option<Result<Option<HeldRecord>, StoreError>> {
        Some(Ok(self.record(key)))
    }

    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        if !ttl.is_zero() {
            self.cache.insert(
                key.to_owned(),
                Record {
                    held: HeldRecord::decoding(key, record),
                    ttl,
                    keeps_expiry: false,
                },
            );
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.meta().leases.remove(key);
        self.cache.invalidate(key);
        Box::pin(std::future::ready(Ok(())))
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
        sets: &'a [String],
    ) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let mut meta = self.meta();
        if meta.leases.len() > LEASE_SWEEP_THRESHOLD {
            meta.leases.retain(|_, lease| lease.expires > now);
        }
        let granted = match meta.leases.get(key) {
            Some(lease) if lease.expires > now => false,
            _ => {
                meta.leases.insert(
                    key.to_owned(),
                    Lease {
                        token: token.to_owned(),
                        expires: now + ttl,
                    },
                );
                for set in sets {
                    meta.sets
                        .entry(set.clone())
                        .or_default()
                        .insert(super::lease_key(key));
                }
                if !sets.is_empty() {
                    self.sweep_sets(&mut meta);
                }
                true
            }
        };
        Box::pin(std::future::ready(Ok(granted)))
    }

    fn extend_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let extended = match self.meta().leases.get_mut(key) {
            Some(lease) if lease.held_by(token, now) => {
                lease.expires = now + ttl;
                true
            }
            _ => false,
        };
        Box::pin(std::future::ready(Ok(extended)))
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        let mut meta = self.meta();
        if meta
            .leases
            .get(key)
            .is_some_and(|lease| lease.token == token)
        {
            meta.leases.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn fill<'a>(&'a self, fill: Fill<'a>) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        // Decoded before the lock is taken: a fill that is refused wasted a
        // decode, not other fills' time.
        let record = HeldRecord::decoding(fill.key, fill.record.clone());
        // Check and store under the lock, so an invalidation that removes
        // the lease first cannot interleave.
        let mut meta = self.meta();
        let held = match fill.token {
            Some(token) => {
                let held = meta
                    .leases
                    .get(fill.fence_key())
                    .is_some_and(|lease| lease.held_by(token, now));
                if held {
                    meta.leases.remove(fill.fence_key());
                }
                held
            }
            None => true,
        };
        if held && !fill.ttl.is_zero() {
            self.cache.insert(
                fill.key.to_owned(),
                Record {
                    held: record,
                    ttl: fill.ttl,
                    keeps_expiry: false,
                },
            );
            for set in fill.sets {
                meta.sets
                    .entry(set.clone())
                    .or_default()
                    .insert(fill.key.to_owned());
            }
            self.sweep_sets(&mut meta);
        }
        drop(meta);
        Box::pin(std::future::ready(Ok(held)))
    }

    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        let (leases, doomed) = self.select(pattern);
        for key in &doomed {
            self.cache.invalidate(key);
        }
        Box::pin(std::future::ready(Ok(leases + doomed.len() as u64)))
    }

    fn delete_members<'a>(&'a self, set: &'a str) -> StoreFuture<'a, u64> {
        let (leases, members) = {
            let mut meta = self.meta();
            let members = meta.sets.remove(set).unwrap_or_default();
            (Self::remove_leases(&mut meta, &members), members)
        };
        let deleted = leases + self.delete_entries(&members);
        Box::pin(std::future::ready(Ok(deleted)))
    }

    fn delete_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
    ) -> StoreFuture<'a, u64> {
        let (leases, members) = {
            let mut meta = self.meta();
            let sets = &mut meta.sets;
            let mut members = HashSet::new();
            if let Some(all) = sets.get_mut(set) {
                all.retain(|member| {
                    let selected = pattern.matches(member);
                    if selected {
                        members.insert(member.clone());
                    }
                    !selected
                });
                if all.is_empty() {
                    sets.remove(set);
                }
            }
            // Leases first, under the lock: no fill of these keys can
            // store from here on.
            (Self::remove_leases(&mut meta, &members), members)
        };
        let deleted = leases + self.delete_entries(&members);
        Box::pin(std::future::ready(Ok(deleted)))
    }

    fn mark_stale<'a>(&'a self, key: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        let lease = u64::from(self.meta().leases.remove(key).is_some());
        let marked = u64::from(self.mark_entry_stale(key, at_ms));
        Box::pin(std::future::ready(Ok(lease + marked)))
    }

    fn mark_stale_matching<'a>(
        &'a self,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        let (leases, selected) = self.select(pattern);
        let marked = self.mark_entries_stale(&selected, at_ms);
        Box::pin(std::future::ready(Ok(leases + marked)))
    }

    fn mark_stale_members<'a>(&'a self, set: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        let changed = self.mark_members_stale(set, None, at_ms);
        Box::pin(std::future::ready(Ok(changed)))
    }

    fn mark_stale_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        let changed = self.mark_members_stale(set, Some(pattern), at_ms);
        Box::pin(std::future::ready(Ok(changed)))
    }
}

impl MemoryStore {
    /// Soft purge through `set`: the members `only` selects (all when
    /// `None`); see [`Store::mark_stale_members`].
    fn mark_members_stale(&self, set: &str, only: Option<&KeyPattern>, at_ms: u64) -> u64 {
        let (changed, entries) = {
            let mut meta = self.meta();
            let mut leases = HashSet::new();
            let mut entries = Vec::new();
            if let Some(all) = meta.sets.get_mut(set) {
                // Leases leave the set; entries stay members, so that a
                // later purge through it still finds them.
                all.retain(|member| {
                    if only.is_some_and(|pattern| !pattern.matches(member)) {
                        return true;
                    }
                    if member.ends_with(":lease") {
                        leases.insert(member.clone());
                        return false;
                    }
                    entries.push(member.clone());
                    true
                });
                if all.is_empty() {
                    meta.sets.remove(set);
                }
            }
            (Self::remove_leases(&mut meta, &leases), entries)
        };
        changed + self.mark_entries_stale(&entries, at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn get_now_answers_what_get_answers() {
        block_on(async {
            let store = MemoryStore::new(1 << 20);
            let arc: Arc<dyn Store> = Arc::new(store.clone());
            let both = |key: &'static str| {
                let store = store.clone();
                let arc = arc.clone();
                async move {
                    let now = store.get_now(key).expect("a memory store answers at once");
                    let through_arc = arc.get_now(key).expect("forwarded through Arc");
                    let later = store.get(key).await.unwrap();
                    assert_eq!(now.unwrap(), later, "{key}");
                    assert_eq!(through_arc.unwrap(), later, "{key}");
                    later
                }
            };
            assert_eq!(both("k").await, None);
            store
                .put("k", Bytes::from_static(b"v"), Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(both("k").await, Some(Bytes::from_static(b"v")));
            store.delete("k").await.unwrap();
            assert_eq!(both("k").await, None);
        });
    }

    #[test]
    fn records_expire_after_their_ttl() {
        block_on(async {
            let store = MemoryStore::new(1 << 20);
            store
                .put("short", Bytes::from_static(b"a"), Duration::from_millis(30))
                .await
                .unwrap();
            store
                .put("long", Bytes::from_static(b"b"), Duration::from_secs(60))
                .await
                .unwrap();
            std::thread::sleep(Duration::from_millis(80));
            assert_eq!(store.get("short").await.unwrap(), None);
            assert_eq!(
                store.get("long").await.unwrap(),
                Some(Bytes::from_static(b"b"))
            );
        });
    }

    #[test]
    fn decoded_records_count_against_the_capacity() {
        block_on(async {
            let store = MemoryStore::new(1 << 20);
            let ttl = Duration::from_secs(60);
            // Bytes that are no record of the layer's: weighed as bytes.
            store
                .put("raw", Bytes::from_static(b"v"), ttl)
                .await
                .unwrap();
            let raw = store.weighted_size();
            assert_eq!(raw, ("raw".len() + 1 + ENTRY_OVERHEAD_BYTES) as u64);
            // A record the layer wrote is kept decoded too, and weighed so.
            let names = [http::HeaderName::from_static("accept-language")];
            let stub = crate::entry::Record::encode_vary(&names, "stub");
            let held = store.get_held_now("raw").unwrap().unwrap().unwrap();
            assert!(held.decoded().is_none());
            store.put("stub", stub.clone(), ttl).await.unwrap();
            let held = store.get_held_now("stub").unwrap().unwrap().unwrap();
            assert!(held.decoded().is_some(), "decoded when stored");
            let stub_weight = store.weighted_size() - raw;
            assert!(
                stub_weight > ("stub".len() + stub.len() + ENTRY_OVERHEAD_BYTES) as u64,
                "{stub_weight}"
            );
        });
    }

    #[test]
    fn capacity_bounds_the_bytes_held() {
        block_on(async {
            let store = MemoryStore::new(64 * 1024);
            for i in 0..1000 {
                store
                    .put(
                        &format!("k{i}"),
                        Bytes::from(vec![0u8; 1000]),
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap();
            }
            assert!(
                store.weighted_size() <= 64 * 1024,
                "{}",
                store.weighted_size()
            );
            assert!(store.entry_count() < 1000);
        });
    }

    #[test]
    fn leases_are_exclusive_and_fence_the_fill() {
        block_on(async {
            let store = MemoryStore::new(1 << 20);
            let ttl = Duration::from_secs(10);
            assert!(store.try_lease("k", "a", ttl, &[]).await.unwrap());
            assert!(!store.try_lease("k", "b", ttl, &[]).await.unwrap());
            assert!(store.extend_lease("k", "a", ttl).await.unwrap());
            assert!(!store.extend_lease("k", "b", ttl).await.unwrap());
            // Someone else's token neither stores nor releases.
            assert!(!store
                .fill(Fill::new("k", Bytes::from_static(b"b"), ttl).fenced_by("b"))
                .await
                .unwrap());
            store.release_lease("k", "b").await.unwrap();
            assert!(!store.try_lease("k", "b", ttl, &[]).await.unwrap());
            // The holder stores, which releases the lease.
            assert!(store
                .fill(Fill::new("k", Bytes::from_static(b"a"), ttl).fenced_by("a"))
                .await
                .unwrap());
            assert_eq!(
                store.get("k").await.unwrap(),
                Some(Bytes::from_static(b"a"))
            );
            assert!(store.try_lease("k", "b", ttl, &[]).await.unwrap());
            store.release_lease("k", "b").await.unwrap();
            // A fill without the lease (lost to an invalidation) stores nothing.
            assert!(!store
                .fill(Fill::new("k", Bytes::from_static(b"c"), ttl).fenced_by("b"))
                .await
                .unwrap());
            assert_eq!(
                store.get("k").await.unwrap(),
                Some(Bytes::from_static(b"a"))
            );
        });
    }

    #[test]
    fn expired_leases_can_be_taken() {
        block_on(async {
            let store = MemoryStore::new(1 << 20);
            assert!(store
                .try_lease("k", "a", Duration::from_millis(20), &[])
                .await
                .unwrap());
            std::thread::sleep(Duration::from_millis(40));
            assert!(!store
                .extend_lease("k", "a", Duration::from_secs(1))
                .await
                .unwrap());
            assert!(store
                .try_lease("k", "b", Duration::from_secs(1), &[])
                .await
                .unwrap());
        });
    }

    #[test]
    fn prefix_and_set_deletion_remove_entries_and_leases() {
        block_on(async {
            let store = MemoryStore::new(1 << 20);
            let ttl = Duration::from_secs(60);
            let keys = ["tf:/a#{1}", "tf:/a/b#{2}", "tf:/ab#{3}"];
            let sets = vec!["tf:idx:/a".to_owned()];
            for key in keys {
                store
                    .fill(Fill::new(key, Bytes::from_static(b"x"), ttl).joining(&sets))
                    .await
                    .unwrap();
            }
            assert!(store
                .try_lease("tf:/a/c#{4}", "t", ttl, &sets)
                .await
                .unwrap());
            let pattern = crate::key::prefix_pattern("tf:", "/a");
            assert_eq!(store.delete_matching(&pattern).await.unwrap(), 3);
            assert_eq!(store.get("tf:/a#{1}").await.unwrap(), None);
            assert_eq!(store.get("tf:/a/b#{2}").await.unwrap(), None);
            assert!(store.get("tf:/ab#{3}").await.unwrap().is_some());
            // The lease went too: its rebuild cannot store.
            let fill = Fill::new("tf:/a/c#{4}", Bytes::from_static(b"old"), ttl).fenced_by("t");
            assert!(!store.fill(fill).await.unwrap());

            // Through the index set: entries and a lease.
            store
                .fill(Fill::new("tf:/a#{1}", Bytes::from_static(b"x"), ttl).joining(&sets))
                .await
                .unwrap();
            assert!(store
                .try_lease("tf:/a/c#{4}", "u", ttl, &sets)
                .await
                .unwrap());
            assert_eq!(store.delete_members("tf:idx:/a").await.unwrap(), 3);
            assert_eq!(store.get("tf:/a#{1}").await.unwrap(), None);
            let fill = Fill::new("tf:/a/c#{4}", Bytes::from_static(b"old"), ttl).fenced_by("u");
            assert!(!store.fill(fill).await.unwrap());
            assert_eq!(store.delete_members("tf:idx:/a").await.unwrap(), 0);
        });
    }

    #[test]
    fn set_deletion_by_pattern_keeps_the_rest_of_the_set() {
        block_on(async {
            let store = MemoryStore::new(1 << 20);
            let ttl = Duration::from_secs(60);
            let sets = vec!["tf:idx:/a".to_owned()];
            for key in ["tf:/a#{1}", "tf:/a#{1}.v9", "tf:/a/b#{2}"] {
                store
                    .fill(Fill::new(key, Bytes::from_static(b"x"), ttl).joining(&sets))
                    .await
                    .unwrap();
            }
            for key in ["tf:/a#{3}", "tf:/a/b#{4}"] {
                assert!(store.try_lease(key, "t", ttl, &sets).await.unwrap());
            }
            let only_a = crate::key::path_pattern("tf:", "/a");
            // Two entries and a lease of `/a`; `/a/b` stays, and stays indexed.
            let deleted = store.delete_members_matching("tf:idx:/a", &only_a);
            assert_eq!(deleted.await.unwrap(), 3);
            assert_eq!(store.get("tf:/a#{1}.v9").await.unwrap(), None);
            let fill = Fill::new("tf:/a#{3}", Bytes::from_static(b"old"), ttl).fenced_by("t");
            assert!(!store.fill(fill).await.unwrap());
            assert!(store.get("tf:/a/b#{2}").await.unwrap().is_some());
            assert!(!store.try_lease("tf:/a/b#{4}", "u", ttl, &[]).await.unwrap());
            assert_eq!(store.delete_members("tf:idx:/a").await.unwrap(), 2);
            assert_eq!(store.get("tf:/a/b#{2}").await.unwrap(), None);
        });
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, Vec<u8>),
        Get(u8),
        Delete(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(k, v)| Op::Put(k % 16, v)),
            any::<u8>().prop_map(|k| Op::Get(k % 16)),
            any::<u8>().prop_map(|k| Op::Delete(k % 16)),
        ]
    }

    proptest! {
        // With room for everything, the store behaves as a map: what a get
        // returns is what the model holds.
        #[test]
        fn behaves_like_a_map_when_nothing_is_evicted(ops in proptest::collection::vec(op(), 0..64)) {
            block_on(async {
                let store = MemoryStore::new(1 << 20);
                let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Put(k, v) => {
                            let key = format!("k{k}");
                            store.put(&key, Bytes::from(v.clone()), Duration::from_secs(60)).await.unwrap();
                            model.insert(key, v);
                        }
                        Op::Get(k) => {
                            let key = format!("k{k}");
                            let got = store.get(&key).await.unwrap().map(|b| b.to_vec());
                            assert_eq!(got, model.get(&key).cloned());
                        }
                        Op::Delete(k) => {
                            let key = format!("k{k}");
                            store.delete(&key).await.unwrap();
                            model.remove(&key);
                        }
                    }
                }
            });
        }

        // Under a tight bound, a get returns either nothing or the latest
        // value put, never an older or foreign one, and the bound holds.
        #[test]
        fn never_returns_a_wrong_value_under_pressure(ops in proptest::collection::vec(op(), 0..128)) {
            block_on(async {
                let store = MemoryStore::new(600);
                let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Put(k, v) => {
                            let key = format!("k{k}");
                            store.put(&key, Bytes::from(v.clone()), Duration::from_secs(60)).await.unwrap();
                            model.insert(key, v);
                        }
                        Op::Get(k) => {
                            let key = format!("k{k}");
                            if let Some(got) = store.get(&key).await.unwrap() {
                                assert_eq!(Some(&got.to_vec()), model.get(&key));
                            }
                        }
                        Op::Delete(k) => {
                            let key = format!("k{k}");
                            store.delete(&key).await.unwrap();
                            model.remove(&key);
                            assert_eq!(store.get(&key).await.unwrap(), None);
                        }
                    }
                }
                assert!(store.weighted_size() <= 600);
            });
        }
    }
}
