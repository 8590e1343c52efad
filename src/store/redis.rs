//! The Redis store: a `bb8` pool of `bb8-redis` connections.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bb8_redis::redis::{self, aio::MultiplexedConnection, RedisError, Script, Value};
use bb8_redis::RedisConnectionManager;
use bytes::Bytes;
use tokio::runtime::Id as RuntimeId;
use tokio::sync::oneshot;

use super::feed::{
    ttl_millis, xadd_key_change, xadd_many_changed, FillFeed, EXTEND_LEASE, FILL_FEED_BLOCK_MS,
    FILL_FEED_MAXLEN, RELEASE_LEASE, SCAN_COUNT, SSCAN_COUNT,
};
use super::removal::{Removal, MARK_STALE};
use super::{
    lease_key, ChangeWatcher, Fill, FillSubscription, KeyPattern, Store, StoreError, StoreFuture,
};

/// The stream that carries fill notifications, unless
/// [`RedisStore::fill_feed_key`] says otherwise.
pub const DEFAULT_FILL_FEED_KEY: &str = "tower-fence:fills";

static FILL: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/fill.lua")));
static TRY_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/try_lease.lua")));

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
/// While other `GET`s are in flight, a hit's `GET` is sent with the others
/// that are ready at that moment, as one pipeline in one write to the
/// socket: on a busy server, writing each `GET` alone costs the process
/// more than all else Redis adds to a hit. An idle store sends a `GET` at
/// once.
///
/// Rebuild leases are `SET lease NX PX` with a random token, extended and
/// released by compare-and-set scripts. A fenced fill is one script that
/// stores the entry only while the lease is held, deletes the lease and
/// appends the key to the *fill feed*, a capped Redis stream. Each store
/// reads the feed on one dedicated connection (`XREAD BLOCK`), shared by all
/// keys, and wakes the requests of its process that wait for a key another
/// process is rebuilding. A stream rather than `PUBLISH`/`SUBSCRIBE`: a bb8
/// pool hands out multiplexed connections, which cannot subscribe, and a
/// reader that reconnects resumes from the last entry it saw instead of
/// losing the fills in between. Waiters also poll, so a lost notification
/// only costs latency.
///
/// Invalidations are appended to the same feed (one `XADD` after the
/// deletes), so that the local tiers of every process
/// ([`local_tier`](crate::FenceLayerBuilder::local_tier)) drop their
/// copies; see [`Store::watch_changes`].
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
    /// Held while a connection is checked out of the pool, so that a burst
    /// of requests on a cold store waits for one checkout, not one each.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// Set by [`Store::reconnect`]: the next connection is a new one, not
    /// one from the pool (whose idle connections may be as dead).
    fresh: Arc<AtomicBool>,
    /// The `GET`s in flight and the batch being gathered.
    reads: Arc<Reads>,
    feed: Arc<FillFeed>,
}

/// Most `GET`s one batch carries; past it a `GET` goes alone.
const BATCH_MAX_GETS: usize = 128;

/// Most batches gathered or in flight at once (a slow or dead server holds
/// each for up to the connection's response timeout); past it a `GET` goes
/// alone.
const BATCHES_MAX: usize = 8;

/// While the values read are larger than this (on average, lately), `GET`s
/// go alone: a large value costs the process far more by its bytes (copied
/// from the socket, parsed, copied again) than by its `GET`'s write, and a
/// batch of them comes back as one burst. At 64 KiB batching won nothing
/// measurable (±10 % between runs, either way), at 1 KiB it won 30–40 %.
const BATCH_MAX_REPLY_BYTES: usize = 16 * 1024;

/// What a `GET` answers.
type Reply = Result<Option<Bytes>, StoreError>;

/// A batch being gathered: each key and where its reply goes.
type Batch = Vec<(String, oneshot::Sender<Reply>)>;

/// The store's `GET`s. A hit is one `GET`, and on a busy server most of a
/// `GET`'s cost is not Redis's but the client's: one write to the socket
/// per command (the multiplexed connection's driver task is woken by each
/// command and, run next by Tokio, writes it alone), one message to that
/// task, one reply channel, one response timer. So while `GET`s are in
/// flight, a new one does not go alone: it joins a batch, which a task
/// sends once the tasks that are ready have run, as one pipeline (one
/// message, one write); each `GET` of it keeps its own reply (an error
/// reply fails that `GET` alone). An idle store sends a `GET` at once, so a
/// lone request waits for nothing.
#[derive(Debug, Default)]
struct Reads {
    /// `GET`s sent alone and batches (gathered or sent) not yet answered.
    in_flight: AtomicUsize,
    /// Batches gathered or sent, not yet answered: at most [`BATCHES_MAX`].
    batches: AtomicUsize,
    /// The batches whose tasks have not taken them yet.
    gathering: Mutex<Gathering>,
    /// A moving average of the size of the values read (each new one
    /// weighs 1/8): while above [`BATCH_MAX_REPLY_BYTES`], `GET`s go alone.
    reply_bytes: AtomicUsize,
    /// `GET`s sent in batches, for tests.
    #[cfg(test)]
    batched: AtomicUsize,
}

/// Batches not yet taken by their tasks; each batch has one task, which
/// takes it by its id.
#[derive(Debug, Default)]
struct Gathering {
    next_id: u64,
    /// The batch that `GET`s join, and the runtime its task runs on: only
    /// `GET`s made on that runtime join it (a caller on that runtime keeps
    /// it running while it waits; another runtime might not be run again).
    open: Option<(u64, RuntimeId, Batch)>,
    /// Batches that filled up before their tasks ran.
    full: Vec<(u64, Batch)>,
}

impl Gathering {
    /// The batch `id`, gone from here (empty when it is gone already).
    fn take(&mut self, id: u64) -> Batch {
        if self.open.as_ref().is_some_and(|(open, _, _)| *open == id) {
            return self
                .open
                .take()
                .map(|(_, _, batch)| batch)
                .unwrap_or_default();
        }
        match self.full.iter().position(|(full, _)| *full == id) {
            Some(at) => self.full.swap_remove(at).1,
            None => Batch::new(),
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.open.is_none() && self.full.is_empty()
    }
}

/// One `GET` sent alone, counted in flight until dropped.
struct Flight<'a>(&'a AtomicUsize);

impl<'a> Flight<'a> {
    fn start(reads: &'a Reads) -> Self {
        reads.in_flight.fetch_add(1, Ordering::AcqRel);
        Flight(&reads.in_flight)
    }
}

impl Reads {
    /// Whether `GET`s should join batches: some are in flight and the
    /// values lately read are small.
    fn should_batch(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
            && self.reply_bytes.load(Ordering::Relaxed) <= BATCH_MAX_REPLY_BYTES
    }

    /// Counts a value of `len` bytes into the average size.
    fn saw_reply(&self, len: usize) {
        let average = self.reply_bytes.load(Ordering::Relaxed);
        let average = average - average / 8 + len / 8;
        self.reply_bytes.store(average, Ordering::Relaxed);
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The task of one batch's hold on it: counts the batch in flight until
/// dropped, and when dropped before it took the batch (its task never ran:
/// the runtime shut down) drops the batch, so that its callers hear that
/// at once and no later `GET` joins a batch nobody will send.
struct BatchSender {
    reads: Arc<Reads>,
    id: u64,
    taken: bool,
}

impl BatchSender {
    /// Counts batch `id` in flight; its count in `batches` is already
    /// taken.
    fn start(reads: &Arc<Reads>, id: u64) -> Self {
        reads.in_flight.fetch_add(1, Ordering::AcqRel);
        BatchSender {
            reads: Arc::clone(reads),
            id,
            taken: false,
        }
    }

    /// The batch gathered so far; later `GET`s go to another.
    fn take(&mut self) -> Batch {
        self.taken = true;
        match self.reads.gathering.lock() {
            Ok(mut gathering) => gathering.take(self.id),
            Err(_) => Batch::new(),
        }
    }
}

impl Drop for BatchSender {
    fn drop(&mut self) {
        if !self.taken {
            drop(self.take());
        }
        self.reads.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.reads.batches.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `GET key`, in buffers of the right size (`redis::cmd` grows them as
/// arguments come).
fn get_command(key: &str) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(2, "GET".len() + key.len());
    cmd.arg("GET").arg(key);
    cmd
}

impl RedisStore {
    /// A store on `pool`. Inside a Tokio runtime it starts reading the fill
    /// feed at once; otherwise at the first wait for a fill.
    pub fn new(pool: RedisPool) -> Self {
        let store = RedisStore {
            pool,
            connection: Arc::new(Mutex::new(None)),
            connecting: Arc::new(tokio::sync::Mutex::new(())),
            fresh: Arc::new(AtomicBool::new(false)),
            reads: Arc::new(Reads::default()),
            feed: Arc::new(FillFeed::new(DEFAULT_FILL_FEED_KEY.to_owned())),
        };
        store.start_feed_reader();
        store
    }

    /// Names the stream that carries fill notifications; stores that share
    /// a Redis and a namespace must share it. Defaults to
    /// [`DEFAULT_FILL_FEED_KEY`].
    #[must_use]
    pub fn fill_feed_key(self, key: impl Into<String>) -> Self {
        let store = RedisStore {
            pool: self.pool,
            connection: self.connection,
            connecting: self.connecting,
            fresh: self.fresh,
            reads: self.reads,
            feed: Arc::new(FillFeed::new(key.into())),
        };
        store.start_feed_reader();
        store
    }

    fn start_feed_reader(&self) {
        let pool = self.pool.clone();
        FillFeed::start_reader(&self.feed, move || {
            let pool = pool.clone();
            async move {
                let mut conn = pool.dedicated_connection().await?;
                conn.set_response_timeout(Duration::from_millis(FILL_FEED_BLOCK_MS * 3));
                Ok(conn)
            }
        });
    }

    /// The pool this store draws connections from.
    pub fn pool(&self) -> &RedisPool {
        &self.pool
    }

    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let conn = if self.fresh.load(Ordering::Acquire) {
            let conn = self
                .pool
                .dedicated_connection()
                .await
                .map_err(StoreError::unavailable)?;
            self.fresh.store(false, Ordering::Release);
            conn
        } else {
            let pooled = self.pool.get().await.map_err(StoreError::unavailable)?;
            let conn = (*pooled).clone();
            drop(pooled);
            conn
        };
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

    /// `GET key`, alone or in a batch: while other `GET`s are in flight,
    /// it joins the batch being gathered (see [`Reads`]); otherwise (an
    /// idle store, large values lately, no runtime to send a batch, batches
    /// at their bound) it goes alone, without waiting for company.
    async fn read(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        if self.reads.should_batch() {
            if let Some(reply) = self.join_batch(key) {
                return reply.await.unwrap_or_else(|_| {
                    Err(StoreError::unavailable("the batch of GETs was dropped"))
                });
            }
        }
        let _flight = Flight::start(&self.reads);
        self.read_alone(key).await
    }

    /// Adds `key` to the batch being gathered, opening one (and spawning
    /// the task that sends it) when there is none or it is full. `None`
    /// when the key must go alone: no batch can be opened (no runtime, or
    /// [`BATCHES_MAX`] of them already).
    fn join_batch(&self, key: &str) -> Option<oneshot::Receiver<Reply>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let runtime_id = runtime.id();
        let mut gathering = self.reads.gathering.lock().ok()?;
        let (tx, rx) = oneshot::channel();
        if let Some((_, opened_on, batch)) = gathering.open.as_mut() {
            if *opened_on == runtime_id && batch.len() < BATCH_MAX_GETS {
                batch.push((key.to_owned(), tx));
                return Some(rx);
            }
        }
        let batches = &self.reads.batches;
        if batches.fetch_add(1, Ordering::AcqRel) >= BATCHES_MAX {
            batches.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let id = gathering.next_id;
        gathering.next_id = id.wrapping_add(1);
        // From here the batch is counted as a `GET` in flight, and the
        // guard undoes both counts whatever becomes of the task.
        let sender = BatchSender::start(&self.reads, id);
        let mut batch = Vec::with_capacity(16);
        batch.push((key.to_owned(), tx));
        if let Some((full, _, batch)) = gathering.open.replace((id, runtime_id, batch)) {
            gathering.full.push((full, batch));
        }
        drop(gathering);
        let store = self.clone();
        runtime.spawn(async move { store.send_batch(sender).await });
        Some(rx)
    }

    /// The task of one batch: lets the other tasks that are ready run
    /// first (they join the batch), then sends every `GET` gathered in one
    /// pipeline, one write, and hands each caller its reply.
    async fn send_batch(self, mut sender: BatchSender) {
        tokio::task::yield_now().await;
        let batch = sender.take();
        if batch.is_empty() {
            return;
        }
        #[cfg(test)]
        self.reads.batched.fetch_add(batch.len(), Ordering::Relaxed);
        let mut pipe = redis::Pipeline::with_capacity(batch.len());
        for (key, _) in &batch {
            pipe.add_command(get_command(key));
        }
        let mut conn = match self.connection().await {
            Ok(conn) => conn,
            Err(err) => {
                for (_, tx) in batch {
                    let _ = tx.send(Err(err.copy_kind()));
                }
                return;
            }
        };
        match conn.send_packed_commands(&pipe, 0, batch.len()).await {
            Ok(values) if values.len() == batch.len() => {
                for ((_, tx), value) in batch.into_iter().zip(values) {
                    let _ = tx.send(self.bulk_reply(value));
                }
            }
            Ok(values) => {
                let err = RedisError::from((
                    redis::ErrorKind::Client,
                    "a pipeline of GETs got the wrong number of replies",
                    format!("{} for {}", values.len(), batch.len()),
                ));
                for (_, tx) in batch {
                    let _ = tx.send(Err(self.fail(err.clone())));
                }
            }
            Err(err) => {
                for (_, tx) in batch {
                    let _ = tx.send(Err(self.fail(err.clone())));
                }
            }
        }
    }

    /// `GET key` alone: the hit path, so it skips what `query` costs on top of
    /// one command. The command is built in buffers of the right size
    /// (`redis::cmd` grows them as arguments come), and sent with
    /// [`MultiplexedConnection::send_packed_command`] rather than through
    /// `ConnectionLike`, which boxes its future.
    async fn read_alone(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let cmd = get_command(key);
        let mut conn = self.connection().await?;
        let value = conn
            .send_packed_command(&cmd)
            .await
            .map_err(|e| self.fail(e))?;
        self.bulk_reply(value)
    }

    /// The reply to a `GET`: nil or a bulk string, whose buffer becomes the
    /// `Bytes` without a copy. Anything else is converted (or refused) as
    /// `query` would.
    fn bulk_reply(&self, value: Value) -> Result<Option<Bytes>, StoreError> {
        match value {
            Value::Nil => Ok(None),
            Value::BulkString(bytes) => {
                self.reads.saw_reply(bytes.len());
                Ok(Some(Bytes::from(bytes)))
            }
            other => {
                let other = other.extract_error().map_err(|e| self.fail(e))?;
                let bytes: Option<Vec<u8>> =
                    redis::from_redis_value(other).map_err(|e| self.fail(e.into()))?;
                Ok(bytes.map(Bytes::from))
            }
        }
    }

    /// `SCAN MATCH glob COUNT …` over the whole keyspace, removing what
    /// each step returns as `removal` says. Each step is one short command:
    /// Redis serves other clients between them.
    async fn scan_remove(&self, glob: &str, removal: Removal) -> Result<u64, StoreError> {
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(glob)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, keys): (u64, Vec<String>) = self.query(&scan).await?;
            removed += self.remove(&keys, removal, None).await?;
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// `SSCAN set COUNT …`, then removal of the members (those `only`
    /// selects, when given) as `removal` says, one step at a time: deleted
    /// members leave the set.
    async fn sscan_remove(
        &self,
        set: &str,
        only: Option<&KeyPattern>,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let mut scan = redis::cmd("SSCAN");
            scan.arg(set).arg(cursor).arg("COUNT").arg(SSCAN_COUNT);
            let (next, mut members): (u64, Vec<String>) = self.query(&scan).await?;
            if let Some(pattern) = only {
                members.retain(|member| pattern.matches(member));
            }
            removed += self.remove(&members, removal, Some(set)).await?;
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// Removes `keys` in one round trip: `UNLINK`ed, or leases deleted and
    /// entries marked stale. What is deleted also leaves `set`, if given.
    /// Returns how many keys changed.
    async fn remove(
        &self,
        keys: &[String],
        removal: Removal,
        set: Option<&str>,
    ) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        let changed = match removal {
            Removal::Delete => {
                pipe.cmd("UNLINK").arg(keys);
                if let Some(set) = set {
                    pipe.cmd("SREM").arg(set).arg(keys).ignore();
                }
                let mut conn = self.connection().await?;
                let (unlinked,): (u64,) = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.fail(e))?;
                unlinked
            }
            Removal::MarkStale { at_ms } => {
                pipe.load_script(&MARK_STALE).ignore();
                for key in keys {
                    pipe.invoke_script(&Removal::mark_stale(key, at_ms));
                }
                let leases: Vec<&String> = keys.iter().filter(|k| k.ends_with(":lease")).collect();
                if let (Some(set), false) = (set, leases.is_empty()) {
                    pipe.cmd("SREM").arg(set).arg(leases).ignore();
                }
                let mut conn = self.connection().await?;
                let marked: Vec<u64> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.fail(e))?;
                marked.iter().sum()
            }
        };
        Ok(changed)
    }
}

impl RedisStore {
    /// Two walks of the keyspace. The first deletes the leases `pattern`
    /// selects: from then on no rebuild under it can store. A rebuild that
    /// stored while that walk ran made a key the walk may have missed, but
    /// that key exists for all of the second walk, which removes it (as
    /// `removal` says) with every other key selected. Then other
    /// processes' local tiers hear of it.
    async fn walk(&self, pattern: &KeyPattern, removal: Removal) -> Result<u64, StoreError> {
        let glob = pattern.glob();
        let leases = self
            .scan_remove(&pattern.leases().glob(), Removal::Delete)
            .await?;
        let entries = self.scan_remove(&glob, removal).await?;
        self.query::<()>(&xadd_many_changed(&self.feed.key, &glob))
            .await?;
        Ok(leases + entries)
    }

    /// Two reads of the set `set` (for the reason [`walk`](Self::walk)
    /// walks twice), removing the members `only` selects (all when `None`)
    /// as `removal` says; what is deleted leaves the set, not the set
    /// itself, so fills that join it meanwhile stay indexed. An entry
    /// marked stale in the first read is not counted again.
    async fn purge_members(
        &self,
        set: &str,
        only: Option<&KeyPattern>,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        let first = self.sscan_remove(set, only, removal).await?;
        let second = self.sscan_remove(set, only, removal).await?;
        self.query::<()>(&xadd_many_changed(&self.feed.key, set))
            .await?;
        Ok(first + second)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("pool", &self.pool.state())
            .finish()
    }
}

impl Store for RedisStore {
    fn reconnect(&self) {
        if let Ok(mut slot) = self.connection.lock() {
            *slot = None;
        }
        self.fresh.store(true, Ordering::Release);
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        Box::pin(self.read(key))
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
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("UNLINK").arg(key).arg(lease_key(key)).ignore();
            pipe.add_command(xadd_key_change(&self.feed.key, key))
                .ignore();
            let mut conn = self.connection().await?;
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| self.fail(e))
        })
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
        sets: &'a [String],
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            if sets.is_empty() {
                let mut cmd = redis::cmd("SET");
                cmd.arg(lease_key(key))
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_millis(ttl));
                let reply: Option<String> = self.query(&cmd).await?;
                return Ok(reply.is_some());
            }
            let mut conn = self.connection().await?;
            let mut invocation = TRY_LEASE.key(lease_key(key));
            for set in sets {
                invocation.key(set);
            }
            let taken: i64 = invocation
                .arg(token)
                .arg(ttl_millis(ttl))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.fail(e))?;
            Ok(taken == 1)
        })
    }

    fn extend_lease<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.connection().await?;
            let extended: i64 = EXTEND_LEASE
                .key(lease_key(key))
                .arg(token)
                .arg(ttl_millis(ttl))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.fail(e))?;
            Ok(extended == 1)
        })
    }

    fn release_lease<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.connection().await?;
            let _: i64 = RELEASE_LEASE
                .key(lease_key(key))
                .arg(token)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.fail(e))?;
            Ok(())
        })
    }

    fn fill<'a>(&'a self, fill: Fill<'a>) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.connection().await?;
            let mut invocation = FILL.key(fill.key);
            invocation
                .key(lease_key(fill.fence_key()))
                .key(&self.feed.key);
            for set in fill.sets {
                invocation.key(set);
            }
            let stored: i64 = invocation
                .arg(fill.token.unwrap_or(""))
                .arg(fill.record.as_ref())
                .arg(ttl_millis(fill.ttl))
                .arg(FILL_FEED_MAXLEN)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.fail(e))?;
            Ok(stored == 1)
        })
    }

    fn delete_matching<'a>(&'a self, pattern: &'a KeyPattern) -> StoreFuture<'a, u64> {
        Box::pin(self.walk(pattern, Removal::Delete))
    }

    fn delete_members<'a>(&'a self, set: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(self.purge_members(set, None, Removal::Delete))
    }

    fn delete_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
    ) -> StoreFuture<'a, u64> {
        Box::pin(self.purge_members(set, Some(pattern), Removal::Delete))
    }

    fn mark_stale<'a>(&'a self, key: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let keys = [lease_key(key), key.to_owned()];
            let changed = self
                .remove(&keys, Removal::MarkStale { at_ms }, None)
                .await?;
            self.query::<()>(&xadd_key_change(&self.feed.key, key))
                .await?;
            Ok(changed)
        })
    }

    fn mark_stale_matching<'a>(
        &'a self,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        Box::pin(self.walk(pattern, Removal::MarkStale { at_ms }))
    }

    fn mark_stale_members<'a>(&'a self, set: &'a str, at_ms: u64) -> StoreFuture<'a, u64> {
        Box::pin(self.purge_members(set, None, Removal::MarkStale { at_ms }))
    }

    fn mark_stale_members_matching<'a>(
        &'a self,
        set: &'a str,
        pattern: &'a KeyPattern,
        at_ms: u64,
    ) -> StoreFuture<'a, u64> {
        Box::pin(self.purge_members(set, Some(pattern), Removal::MarkStale { at_ms }))
    }

    fn subscribe_fill(&self, key: &str) -> Option<FillSubscription> {
        self.start_feed_reader();
        Some(self.feed.subscribe(key))
    }

    fn watch_changes(&self, watcher: ChangeWatcher) -> bool {
        self.feed.watch(watcher);
        self.start_feed_reader();
        true
    }
}

/// The integration tests' harness: private `redis-server` processes.
#[cfg(test)]
#[path = "../../tests/support/mod.rs"]
mod test_support;

#[cfg(test)]
mod tests {
    use futures_util::future::join_all;

    use super::test_support::RedisProcess;
    use super::*;

    fn value_of(i: usize) -> Vec<u8> {
        format!("value {i} ").repeat(i + 1).into_bytes()
    }

    /// The batch path hands every caller its own key's reply: values of
    /// different lengths, a missing key, an error reply for one key only.
    /// Polled in one task, the first `GET` goes alone and, while it is in
    /// flight, all the others join batches.
    #[tokio::test]
    async fn batched_gets_each_get_their_own_reply() {
        let server = RedisProcess::start_async().await;
        let pool = server.pool().await;
        let store = RedisStore::new(pool.clone());
        let keys: Vec<String> = (0..300).map(|i| format!("tf:/batch#{i}")).collect();
        {
            let mut conn = pool.get().await.expect("connection");
            for (i, key) in keys.iter().enumerate() {
                let _: () = redis::cmd("SET")
                    .arg(key)
                    .arg(value_of(i))
                    .query_async(&mut *conn)
                    .await
                    .expect("SET");
            }
            let _: () = redis::cmd("HSET")
                .arg("tf:/hash")
                .arg("field")
                .arg("value")
                .query_async(&mut *conn)
                .await
                .expect("HSET");
        }

        let mut asked: Vec<&str> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            asked.push(key);
            if i % 50 == 7 {
                asked.push("tf:/missing");
                asked.push("tf:/hash");
            }
        }
        let replies = join_all(asked.iter().map(|key| store.get(key))).await;

        for (key, reply) in asked.iter().zip(replies) {
            match *key {
                "tf:/missing" => assert!(matches!(reply, Ok(None)), "{key}: {reply:?}"),
                "tf:/hash" => match reply {
                    Err(err) => assert!(!err.is_unavailable(), "{key}: {err:?}"),
                    Ok(found) => panic!("{key}: a hash read as {found:?}"),
                },
                _ => {
                    let i: usize = key["tf:/batch#".len()..].parse().expect("index");
                    let found = reply.expect("GET").expect("stored");
                    assert_eq!(found.as_ref(), value_of(i).as_slice(), "{key}");
                }
            }
        }
        assert!(asked.len() > 2 * BATCH_MAX_GETS, "more than two batches");
        assert_eq!(
            store.reads.batched.load(Ordering::Relaxed),
            asked.len() - 1,
            "all but the first GET went in batches"
        );
        assert_eq!(store.reads.in_flight.load(Ordering::Acquire), 0);
        assert_eq!(store.reads.batches.load(Ordering::Acquire), 0);
        assert!(store.reads.gathering.lock().expect("lock").is_empty());
        drop(server);
    }

    /// After large values, `GET`s go alone even while others are in
    /// flight; small values bring batches back.
    #[tokio::test]
    async fn large_values_are_read_alone() {
        let server = RedisProcess::start_async().await;
        let pool = server.pool().await;
        let store = RedisStore::new(pool.clone());
        {
            let mut conn = pool.get().await.expect("connection");
            for (key, len) in [("tf:/large", 64 * 1024), ("tf:/small", 100)] {
                let _: () = redis::cmd("SET")
                    .arg(key)
                    .arg(vec![b'x'; len])
                    .query_async(&mut *conn)
                    .await
                    .expect("SET");
            }
        }
        let batched = || store.reads.batched.load(Ordering::Relaxed);
        for _ in 0..20 {
            store.get("tf:/large").await.expect("GET").expect("stored");
        }
        let replies = join_all((0..20).map(|_| store.get("tf:/large"))).await;
        assert!(replies
            .iter()
            .all(|r| matches!(r, Ok(Some(v)) if v.len() == 64 * 1024)));
        assert_eq!(batched(), 0, "large values: every GET went alone");

        for _ in 0..40 {
            store.get("tf:/small").await.expect("GET").expect("stored");
        }
        let replies = join_all((0..20).map(|_| store.get("tf:/small"))).await;
        assert!(replies
            .iter()
            .all(|r| matches!(r, Ok(Some(v)) if v.len() == 100)));
        assert_eq!(batched(), 19, "small values again: batches again");
        drop(server);
    }

    /// A batch whose task never runs (its runtime shut down first) fails
    /// its callers at once, and no later `GET` joins it.
    #[test]
    fn a_batch_whose_task_never_ran_is_dropped() {
        // Never driven: nothing spawned on it runs.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = runtime.enter();
        let manager = RedisConnectionManager::new("redis://127.0.0.1:1").expect("valid url");
        let store = RedisStore::new(bb8::Pool::builder().build_unchecked(manager));
        // As if a GET were in flight, so that the next one gathers a batch.
        store.reads.in_flight.fetch_add(1, Ordering::AcqRel);
        let (mut first, mut second) = {
            let first = store.join_batch("tf:/a").expect("a batch opens");
            let second = store.join_batch("tf:/b").expect("joins the open batch");
            (first, second)
        };
        assert_eq!(store.reads.batches.load(Ordering::Acquire), 1);
        drop(_entered);
        drop(runtime);
        assert!(first.try_recv().is_err());
        assert!(second.try_recv().is_err());
        assert!(store.reads.gathering.lock().expect("lock").is_empty());
        assert_eq!(store.reads.batches.load(Ordering::Acquire), 0);
        assert_eq!(store.reads.in_flight.load(Ordering::Acquire), 1);
    }

    /// A `GET` made on another runtime does not join a batch whose task
    /// runs on the first: that runtime may never be run again (here it is
    /// dropped), and its batch's callers alone hear of it.
    #[test]
    fn batches_are_joined_on_their_own_runtime_only() {
        let first_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let second_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store = {
            let _entered = first_runtime.enter();
            let manager = RedisConnectionManager::new("redis://127.0.0.1:1").expect("valid url");
            RedisStore::new(bb8::Pool::builder().build_unchecked(manager))
        };
        store.reads.in_flight.fetch_add(1, Ordering::AcqRel);
        let mut on_first = {
            let _entered = first_runtime.enter();
            store.join_batch("tf:/a").expect("a batch opens")
        };
        let mut on_second = {
            let _entered = second_runtime.enter();
            store.join_batch("tf:/b").expect("another batch opens")
        };
        assert_eq!(store.reads.batches.load(Ordering::Acquire), 2);
        drop(first_runtime);
        assert!(matches!(
            on_first.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            on_second.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        drop(second_runtime);
        assert!(on_second.try_recv().is_err());
        assert_eq!(store.reads.batches.load(Ordering::Acquire), 0);
        assert!(store.reads.gathering.lock().expect("lock").is_empty());
    }
}
