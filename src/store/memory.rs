//! The in-process store.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;

use super::{Store, StoreFuture};

/// Bytes counted for an entry besides its key and record (moka's own
/// bookkeeping, roughly).
const ENTRY_OVERHEAD_BYTES: usize = 96;

/// Default capacity of [`MemoryStore::default`]: 64 MiB.
pub const DEFAULT_MEMORY_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

/// An in-process store bounded by the total size of its keys and records,
/// with a time to live per record. Backed by [moka] (TinyLFU admission, LRU
/// eviction); entries are not shared between processes.
///
/// [moka]: https://docs.rs/moka
///
/// Rebuild leases are kept in process too, with the same semantics as in
/// Redis: a fenced fill stores only while its lease is held.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<String, Record>,
    capacity_bytes: u64,
    leases: Arc<Mutex<HashMap<String, Lease>>>,
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

#[derive(Clone)]
struct Record {
    bytes: Bytes,
    ttl: Duration,
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
        _: Option<Duration>,
    ) -> Option<Duration> {
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
                let weight = key.len() + record.bytes.len() + ENTRY_OVERHEAD_BYTES;
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .expire_after(PerRecordTtl)
            .build();
        MemoryStore {
            cache,
            capacity_bytes,
            leases: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The configured capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes held now (keys, records and overhead), after pending evictions
    /// have run.
    pub fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        // A panic while holding the lock leaves a consistent map: recover it.
        self.leases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        let found = self.cache.get(key).map(|record| record.bytes);
        Box::pin(std::future::ready(Ok(found)))
    }

    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        if !ttl.is_zero() {
            self.cache
                .insert(key.to_owned(), Record { bytes: record, ttl });
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.cache.invalidate(key);
        Box::pin(std::future::ready(Ok(())))
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let mut leases = self.leases();
        if leases.len() > LEASE_SWEEP_THRESHOLD {
            leases.retain(|_, lease| lease.expires > now);
        }
        let granted = match leases.get(key) {
            Some(lease) if lease.expires > now => false,
            _ => {
                leases.insert(
                    key.to_owned(),
                    Lease {
                        token: token.to_owned(),
                        expires: now + ttl,
                    },
                );
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
        let extended = match self.leases().get_mut(key) {
            Some(lease) if lease.held_by(token, now) => {
                lease.expires = now + ttl;
                true
            }
            _ => false,
        };
        Box::pin(std::future::ready(Ok(extended)))
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        let mut leases = self.leases();
        if leases.get(key).is_some_and(|lease| lease.token == token) {
            leases.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        record: Bytes,
        ttl: Duration,
        token: &'a str,
    ) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        // Check and store under the lease lock, so an invalidation that
        // removes the lease first cannot interleave.
        let mut leases = self.leases();
        let held = leases
            .get(key)
            .is_some_and(|lease| lease.held_by(token, now));
        if held {
            leases.remove(key);
            if !ttl.is_zero() {
                self.cache
                    .insert(key.to_owned(), Record { bytes: record, ttl });
            }
        }
        drop(leases);
        Box::pin(std::future::ready(Ok(held)))
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
            assert!(store.try_lease("k", "a", ttl).await.unwrap());
            assert!(!store.try_lease("k", "b", ttl).await.unwrap());
            assert!(store.extend_lease("k", "a", ttl).await.unwrap());
            assert!(!store.extend_lease("k", "b", ttl).await.unwrap());
            // Someone else's token neither stores nor releases.
            assert!(!store
                .put_fenced("k", Bytes::from_static(b"b"), ttl, "b")
                .await
                .unwrap());
            store.release_lease("k", "b").await.unwrap();
            assert!(!store.try_lease("k", "b", ttl).await.unwrap());
            // The holder stores, which releases the lease.
            assert!(store
                .put_fenced("k", Bytes::from_static(b"a"), ttl, "a")
                .await
                .unwrap());
            assert_eq!(
                store.get("k").await.unwrap(),
                Some(Bytes::from_static(b"a"))
            );
            assert!(store.try_lease("k", "b", ttl).await.unwrap());
            store.release_lease("k", "b").await.unwrap();
            // A fill without the lease (lost to an invalidation) stores nothing.
            assert!(!store
                .put_fenced("k", Bytes::from_static(b"c"), ttl, "b")
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
                .try_lease("k", "a", Duration::from_millis(20))
                .await
                .unwrap());
            std::thread::sleep(Duration::from_millis(40));
            assert!(!store
                .extend_lease("k", "a", Duration::from_secs(1))
                .await
                .unwrap());
            assert!(store
                .try_lease("k", "b", Duration::from_secs(1))
                .await
                .unwrap());
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
