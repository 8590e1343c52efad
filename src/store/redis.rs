//! The Redis store: a `bb8` pool of `bb8-redis` connections.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bb8_redis::redis::{self, aio::MultiplexedConnection, RedisError};
use bb8_redis::RedisConnectionManager;
use bytes::Bytes;

use super::{Store, StoreError, StoreFuture};

/// The pool type [`RedisStore`] and [`FenceLayer::new`](crate::FenceLayer::new)
/// take.
pub type RedisPool = bb8::Pool<RedisConnectionManager>;

/// A store in Redis, shared by every process that points at the same server.
///
/// A hit is one `GET` of one value; a fill one `SET … PX`. bb8 checks each
/// checkout with a `PING` unless the pool was built with
/// `test_on_check_out(false)`, which would double the cost of a hit; and a
/// bb8-redis connection is multiplexed (one socket carries any number of
/// concurrent commands). So the store checks a connection out of the pool
/// once, keeps a clone of it, and goes back to the pool only when that
/// connection breaks: a hit is one round trip whatever the pool's settings.
///
/// ```no_run
/// use bb8_redis::RedisConnectionManager;
/// use tower_fence::store::RedisStore;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let manager = RedisConnectionManager::new("redis://127.0.0.1:6379")?;
/// let pool = bb8::Pool::builder().build(manager).await?;
/// let store = RedisStore::new(pool);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    pool: RedisPool,
    connection: Arc<Mutex<Option<MultiplexedConnection>>>,
}

impl RedisStore {
    /// A store on `pool`.
    pub fn new(pool: RedisPool) -> Self {
        RedisStore {
            pool,
            connection: Arc::new(Mutex::new(None)),
        }
    }

    /// The pool this store draws connections from.
    pub fn pool(&self) -> &RedisPool {
        &self.pool
    }

    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let pooled = self.pool.get().await.map_err(StoreError::unavailable)?;
        let conn = (*pooled).clone();
        drop(pooled);
        if let Ok(mut slot) = self.connection.lock() {
            *slot = Some(conn.clone());
        }
        Ok(conn)
    }

    fn cached(&self) -> Option<MultiplexedConnection> {
        self.connection.lock().ok().and_then(|slot| slot.clone())
    }

    /// Maps a command error; forgets the shared connection when it broke so
    /// that the next call takes a fresh one from the pool.
    fn fail(&self, err: RedisError) -> StoreError {
        if err.is_connection_dropped() || err.is_io_error() || err.is_unrecoverable_error() {
            if let Ok(mut slot) = self.connection.lock() {
                *slot = None;
            }
            StoreError::unavailable(err)
        } else {
            StoreError::backend(err)
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.connection().await?;
        cmd.query_async(&mut conn).await.map_err(|e| self.fail(e))
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("pool", &self.pool.state())
            .finish()
    }
}

fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Store for RedisStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let value: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(key)).await?;
            Ok(value.map(Bytes::from))
        })
    }

    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key)
                .arg(record.as_ref())
                .arg("PX")
                .arg(ttl_millis(ttl));
            self.query::<()>(&cmd).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.query::<()>(redis::cmd("UNLINK").arg(key)).await })
    }
}
