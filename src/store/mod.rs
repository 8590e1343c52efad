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
pub use self::redis::{RedisPool, RedisStore};

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
}
