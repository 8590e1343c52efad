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

mod memory;
pub use memory::{MemoryStore, DEFAULT_MEMORY_CAPACITY_BYTES};

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisPool, RedisStore, DEFAULT_FILL_FEED_KEY};

/// The future a [`Store`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A place to keep cached records.
///
/// Records are opaque bytes; keys are the layer's (see the crate docs for
/// their shape). Implementations must be cheap to call concurrently: the
/// layer shares one store between every service it makes.
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

    /// Stores `record` under `key`, replacing what was there, for `ttl`.
    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()>;

    /// Removes the record under `key`, if any.
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;

    /// Takes the rebuild lease of `key` for `ttl`, unless someone holds it:
    /// `true` when `token` now holds it. The lease is what makes one request
    /// in the whole fleet rebuild a key while the others wait.
    ///
    /// The default has no cross-process coordination and always grants the
    /// lease (the in-process single flight still applies).
    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let _ = (key, token, ttl);
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

    /// Stores `record` under `key` only if `token` still holds the lease of
    /// `key`, releases the lease and tells waiting processes that the key
    /// was filled, at once. `false` when the lease was lost: the record is
    /// not stored (an invalidation removed the lease during the rebuild, so
    /// the rebuilt value may already be stale).
    ///
    /// The default stores unconditionally.
    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        record: Bytes,
        ttl: Duration,
        token: &'a str,
    ) -> StoreFuture<'a, bool> {
        let _ = token;
        Box::pin(async move {
            self.put(key, record, ttl).await?;
            Ok(true)
        })
    }

    /// A subscription that wakes when another process fills `key` (see
    /// [`put_fenced`](Store::put_fenced)). `None` when the store has no such
    /// notifications: waiters then poll.
    fn subscribe_fill(&self, key: &str) -> Option<FillSubscription> {
        let _ = key;
        None
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
    ) -> StoreFuture<'a, bool> {
        (**self).try_lease(key, token, ttl)
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

    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        record: Bytes,
        ttl: Duration,
        token: &'a str,
    ) -> StoreFuture<'a, bool> {
        (**self).put_fenced(key, record, ttl, token)
    }

    fn subscribe_fill(&self, key: &str) -> Option<FillSubscription> {
        (**self).subscribe_fill(key)
    }
}

/// The key of the rebuild lease of the entry under `key`. It shares the
/// entry's readable path (so a path-prefix invalidation removes it too) and
/// its hash tag (so it lives in the entry's cluster slot).
pub fn lease_key(key: &str) -> String {
    format!("{key}:lease")
}
