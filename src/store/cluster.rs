//! The Redis Cluster store: one multiplexed `redis` cluster connection.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use ::redis::{self as rds, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, Script};
use bytes::Bytes;

use super::feed::{
    ttl_millis, xadd_key_change, xadd_many_changed, FillFeed, EXTEND_LEASE, FILL_FEED_BLOCK_MS,
    FILL_FEED_MAXLEN, RELEASE_LEASE, SCAN_COUNT, SSCAN_COUNT,
};
use super::removal::Removal;
use super::{
    lease_key, ChangeWatcher, Fill, FillSubscription, KeyPattern, Store, StoreError, StoreFuture,
    DEFAULT_FILL_FEED_KEY,
};

/// The fenced part of a fill, on the entry's slot only: stores the entry
/// while the lease is held (when fenced) and releases the lease.
const FENCED_STORE_LUA: &str = r"
-- KEYS[1] entry, KEYS[2] lease (same slot: same hash tag)
-- ARGV[1] lease token ('' = unfenced), ARGV[2] record, ARGV[3] ttl in ms
if ARGV[1] ~= '' then
    if redis.call('GET', KEYS[2]) ~= ARGV[1] then
        return 0
    end
    redis.call('DEL', KEYS[2])
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
";

/// Adds a member (a key of another slot, stored as a plain value) to one set
/// and keeps the set at least as long as the member.
const JOIN_SET_LUA: &str = r"
-- KEYS[1] set; ARGV[1] member, ARGV[2] ttl in ms
local ttl = tonumber(ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
";

static FENCED_STORE: LazyLock<Script> = LazyLock::new(|| Script::new(FENCED_STORE_LUA));
static JOIN_SET: LazyLock<Script> = LazyLock::new(|| Script::new(JOIN_SET_LUA));

/// A store in a Redis Cluster (feature `cluster`), shared by every process
/// that points at the same cluster.
///
/// It speaks to the cluster through one multiplexed
/// [`ClusterConnection`](::redis::cluster_async::ClusterConnection), made at
/// the first use and shared by every clone of the store; it is made again
/// when it breaks. A hit is one `GET`, a plain fill one script on the
/// entry's slot.
///
/// Keys carry a hash tag (`…#{hash}`), so an entry, its rebuild lease and
/// its variants live in one slot, and everything [`RedisStore`] does on one
/// key is just as atomic here: the lease is `SET NX PX`, extended and
/// released by compare-and-set scripts, and a fenced fill stores the entry
/// only while its lease is held, in one script.
///
/// What spans slots is done in steps rather than in one script:
///
/// - the index and tag sets each live in their own slot: a key joins each
///   set with a small script per set (`SADD`, and the set's TTL raised to
///   the member's). A fill joins its sets before the fenced store (so an
///   invalidation that runs while it stores finds it) and again after (so it
///   stays indexed if an invalidation emptied the set meanwhile); a lease
///   the same way around `SET NX`. The protection of the indexed prefix
///   strategy against a rebuild racing a write (the write's invalidation
///   removes the lease, and the fill is fenced out) therefore holds once
///   these writes have landed, not atomically with them: only an
///   invalidation that starts and ends inside the few round trips of a
///   lease's or a fill's joins can miss it. Dead members (keys that expired)
///   are not swept from the sets, unlike on a single node: a script cannot
///   check keys of other slots. Invalidating a set removes its members as
///   usual; untouched sets expire with their newest member.
/// - the fill feed (a capped stream, see [`RedisStore`]) is its own key:
///   the fill appends to it after the entry is stored. Each store reads it
///   with `XREAD BLOCK` on a *second* cluster connection, so that the
///   blocking read never holds up other commands to that node.
/// - a prefix invalidation `SCAN`s every master (from `CLUSTER NODES`), the
///   leases first, then the entries, and `UNLINK`s what it finds one slot at
///   a time; a set invalidation `SSCAN`s the set and `UNLINK`s its members
///   one slot at a time.
///
/// [`RedisStore`]: super::RedisStore
///
/// ```no_run
/// use tower_fence::store::RedisClusterStore;
/// use tower_fence::FenceLayer;
///
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisClusterStore::new([
///     "redis://10.0.0.1:6379",
///     "redis://10.0.0.2:6379",
///     "redis://10.0.0.3:6379",
/// ])?;
/// let layer = FenceLayer::builder().store(store).build()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisClusterStore {
    shared: Arc<Shared>,
    feed: Arc<FillFeed>,
}

struct Shared {
    client: ClusterClient,
    /// The fill feed reader's client: its reads block, so its response
    /// timeout is longer than a blocking read.
    reader_client: ClusterClient,
    connection: Mutex<Option<ClusterConnection>>,
    /// Held while connecting, so that a burst of requests on a cold store
    /// waits for one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
}

impl RedisClusterStore {
    /// A store on the cluster that `nodes` (some or all of its nodes, e.g.
    /// `redis://10.0.0.1:6379`) belong to. Connects at the first use; inside
    /// a Tokio runtime it starts reading the fill feed at once, otherwise at
    /// the first wait for a fill. Fails only when a node address is invalid.
    pub fn new(
        nodes: impl IntoIterator<Item = impl IntoConnectionInfo>,
    ) -> Result<Self, StoreError> {
        let nodes = nodes
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect::<Result<Vec<ConnectionInfo>, RedisError>>()
            .map_err(StoreError::backend)?;
        if nodes.is_empty() {
            return Err(StoreError::backend("no Redis Cluster node given"));
        }
        let client = ClusterClient::new(nodes.clone()).map_err(StoreError::backend)?;
        let reader_client = ClusterClientBuilder::new(nodes)
            .response_timeout(Duration::from_millis(FILL_FEED_BLOCK_MS * 3))
            .build()
            .map_err(StoreError::backend)?;
        let store = RedisClusterStore {
            shared: Arc::new(Shared {
                client,
                reader_client,
                connection: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
            feed: Arc::new(FillFeed::new(DEFAULT_FILL_FEED_KEY.to_owned())),
        };
        store.start_feed_reader();
        Ok(store)
    }

    /// Names the stream that carries fill notifications; stores that share
    /// a cluster and a namespace must share it. Defaults to
    /// [`DEFAULT_FILL_FEED_KEY`].
    #[must_use]
    pub fn fill_feed_key(self, key: impl Into<String>) -> Self {
        let store = RedisClusterStore {
            shared: self.shared,
            feed: Arc::new(FillFeed::new(key.into())),
        };
        store.start_feed_reader();
        store
    }

    fn start_feed_reader(&self) {
        let client = self.shared.reader_client.clone();
        FillFeed::start_reader(&self.feed, move || {
            let client = client.clone();
            async move { client.get_async_connection().await }
        });
    }

    async fn connection(&self) -> Result<ClusterConnection, StoreError> {
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let _connecting = self.shared.connecting.lock().await;
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let conn = self
            .shared
            .client
            .get_async_connection()
            .await
            .map_err(StoreError::unavailable)?;
        if let Ok(mut slot) = self.shared.connection.lock() {
            *slot = Some(conn.clone());
        }
        Ok(conn)
    }

    fn cached(&self) -> Option<ClusterConnection> {
        self.shared
            .connection
            .lock()
            .ok()
            .and_then(|slot| slot.clone())
    }

    /// Maps a command error; forgets the shared connection when it broke so
    /// that the next call makes a fresh one.
    fn fail(&self, err: RedisError) -> StoreError {
        if err.is_connection_dropped()
            || err.is_io_error()
            || err.is_unrecoverable_error()
            || err.kind() == ErrorKind::ClusterConnectionNotFound
        {
            if let Ok(mut slot) = self.shared.connection.lock() {
                *slot = None;
            }
            StoreError::unavailable(err)
        } else {
            StoreError::backend(err)
        }
    }

    async fn query<T: rds::FromRedisValue>(&self, cmd: &rds::Cmd) -> Result<T, StoreError> {
        let mut conn = self.connection().await?;
        cmd.query_async(&mut conn).await.map_err(|e| self.fail(e))
    }

    /// Adds `member` to each of `sets` (one script per set, each on its own
    /// slot, all sent at once), raising each set's TTL to `ttl`.
    async fn join_sets(&self, member: &str, sets: &[String], ttl: u64) -> Result<(), StoreError> {
        if sets.is_empty() {
            return Ok(());
        }
        let conn = self.connection().await?;
        let mut joins = tokio::task::JoinSet::new();
        for set in sets {
            let mut conn = conn.clone();
            let set = set.clone();
            let member = member.to_owned();
            joins.spawn(async move {
                JOIN_SET
                    .key(set)
                    .arg(member)
                    .arg(ttl)
                    .invoke_async::<i64>(&mut conn)
                    .await
            });
        }
        while let Some(joined) = joins.join_next().await {
            match joined {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return Err(self.fail(err)),
                Err(err) => return Err(StoreError::backend(err)),
            }
        }
        self.prune_sets_behind(conn, sets);
        Ok(())
    }

    /// Drops up to two members of each of `sets` whose keys are gone, in
    /// the background: what `fill.lua` does inside its script on one Redis,
    /// which a cluster script cannot (the members live in other slots).
    /// Without it a set renewed by every lease (the in-flight set) would
    /// keep every lease it ever had.
    fn prune_sets_behind(&self, conn: ClusterConnection, sets: &[String]) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let sets = sets.to_vec();
        runtime.spawn(async move {
            for set in sets {
                let mut conn = conn.clone();
                let members: Vec<String> = match rds::cmd("SRANDMEMBER")
                    .arg(&set)
                    .arg(2)
                    .query_async(&mut conn)
                    .await
                {
                    Ok(members) => members,
                    Err(_) => return,
                };
                for member in members {
                    let exists: i64 =
                        match rds::cmd("EXISTS").arg(&member).query_async(&mut conn).await {
                            Ok(n) => n,
                            Err(_) => return,
                        };
                    if exists == 0 {
                        let _: Result<i64, _> = rds::cmd("SREM")
                            .arg(&set)
                            .arg(&member)
                            .query_async(&mut conn)
                            .await;
                    }
                }
            }
        });
    }

    /// `UNLINK`s `keys`, one command per slot (a multi-key command across
    /// slots fails with `CROSSSLOT`), all sent at once. Returns how many
    /// existed.
    async fn unlink(&self, keys: Vec<String>) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut by_slot: HashMap<Slot, Vec<String>> = HashMap::new();
        for key in keys {
            by_slot.entry(Slot::for_key(&key)).or_default().push(key);
        }
        let conn = self.connection().await?;
        let mut unlinks = tokio::task::JoinSet::new();
        for (slot, keys) in by_slot {
            let mut conn = conn.clone();
            unlinks.spawn(async move {
                let mut cmd = rds::cmd("UNLINK");
                cmd.arg(keys);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_slot(slot, SlotAddr::Master),
                ));
                let value = conn.route_command(cmd, routing).await?;
                rds::from_redis_value::<u64>(value).map_err(RedisError::from)
            });
        }
        self.sum(unlinks).await
    }

    /// Removes `keys` as `removal` says: `UNLINK`ed (see
    /// [`unlink`](Self::unlink)), or leases deleted and entries marked
    /// stale, one script per key on its own slot, all sent at once.
    /// Returns how many keys changed.
    async fn remove(&self, keys: Vec<String>, removal: Removal) -> Result<u64, StoreError> {
        let Removal::MarkStale { at_ms } = removal else {
            return self.unlink(keys).await;
        };
        if keys.is_empty() {
            return Ok(0);
        }
        let conn = self.connection().await?;
        let mut marks = tokio::task::JoinSet::new();
        for key in keys {
            let mut conn = conn.clone();
            marks.spawn(async move {
                Removal::mark_stale(&key, at_ms)
                    .invoke_async::<u64>(&mut conn)
                    .await
            });
        }
        self.sum(marks).await
    }

    /// The sum of the counts `tasks` return; the first error fails it.
    async fn sum(
        &self,
        mut tasks: tokio::task::JoinSet<Result<u64, RedisError>>,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(n)) => total += n,
                Ok(Err(err)) => return Err(self.fail(err)),
                Err(err) => return Err(StoreError::backend(err)),
            }
        }
        Ok(total)
    }

    /// One slot served by each master of the cluster, read from
    /// `CLUSTER NODES`: routing a command to that slot reaches that master.
    /// An error unless the masters that are not failed serve every slot: a
    /// walk that missed a failed master's keys would report success while
    /// its replica, once promoted, still holds them; as an error, the
    /// invalidation is retried after the failover.
    async fn masters(&self) -> Result<Masters, StoreError> {
        let nodes: String = self.query(rds::cmd("CLUSTER").arg("NODES")).await?;
        let masters = parse_masters(&nodes);
        if masters.first_slots.is_empty() {
            return Err(StoreError::backend(
                "CLUSTER NODES names no master serving a slot",
            ));
        }
        if masters.covered < SLOTS {
            return Err(StoreError::unavailable(format!(
                "the cluster's live masters serve {} of {SLOTS} slots (a master failed)",
                masters.covered
            )));
        }
        Ok(masters)
    }

    /// `SCAN MATCH glob COUNT …` over the keyspace of the master at
    /// `address` (by address, not by slot: a client that cannot reach a
    /// slot's master must fail, not scan another node instead), `UNLINK`ing
    /// what each step returns.
    async fn scan_remove(
        &self,
        address: &(String, u16),
        glob: &str,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: address.0.clone(),
            port: address.1,
        });
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        loop {
            let mut scan = rds::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(glob)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let mut conn = self.connection().await?;
            let value = conn
                .route_command(scan, routing.clone())
                .await
                .map_err(|e| self.fail(e))?;
            let (next, keys): (u64, Vec<String>) =
                rds::from_redis_value(value).map_err(StoreError::backend)?;
            deleted += self.remove(keys, removal).await?;
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// [`scan_remove`](Self::scan_remove) on every master.
    async fn scan_remove_all(
        &self,
        masters: &Masters,
        glob: &str,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        for address in &masters.addresses {
            removed += self.scan_remove(address, glob, removal).await?;
        }
        Ok(removed)
    }

    /// `SSCAN set COUNT …`, then removal of the members (those `only`
    /// selects, when given; by slot) as `removal` says, one step at a time:
    /// what is deleted leaves the set.
    async fn sscan_remove(
        &self,
        set: &str,
        only: Option<&KeyPattern>,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let mut scan = rds::cmd("SSCAN");
            scan.arg(set).arg(cursor).arg("COUNT").arg(SSCAN_COUNT);
            let (next, mut members): (u64, Vec<String>) = self.query(&scan).await?;
            if let Some(pattern) = only {
                members.retain(|member| pattern.matches(member));
            }
            let leaving: Vec<String> = match removal {
                Removal::Delete => members.clone(),
                Removal::MarkStale { .. } => members
                    .iter()
                    .filter(|m| m.ends_with(":lease"))
                    .cloned()
                    .collect(),
            };
            removed += self.remove(members, removal).await?;
            if !leaving.is_empty() {
                let mut srem = rds::cmd("SREM");
                srem.arg(set).arg(&leaving);
                self.query::<()>(&srem).await?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

impl RedisClusterStore {
    /// Two walks of every master, leases first (deleted), then what
    /// `pattern` selects, removed as `removal` says, for the reason
    /// `RedisStore::walk` gives.
    async fn walk(&self, pattern: &KeyPattern, removal: Removal) -> Result<u64, StoreError> {
        let masters = self.masters().await?;
        let leases = self
            .scan_remove_all(&masters, &pattern.leases().glob(), Removal::Delete)
            .await?;
        let entries = self
            .scan_remove_all(&masters, &pattern.glob(), removal)
            .await?;
        // A failover during the walk: a replica now serves keys the walk
        // did not see. Fail, so that the invalidation is retried.
        if self.masters().await?.addresses != masters.addresses {
            return Err(StoreError::unavailable(
                "the cluster's masters changed during the walk",
            ));
        }
        // Local tiers of other instances drop what they hold.
        self.query::<()>(&xadd_many_changed(&self.feed.key, &pattern.glob()))
            .await?;
        Ok(leases + entries)
    }

    /// Two reads of the set (as `RedisStore::purge_members`), removing the
    /// members `only` selects as `removal` says.
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

/// Slots of a Redis Cluster.
const SLOTS: u32 = 16_384;

/// The masters of a `CLUSTER NODES` reply that serve slots and are not
/// failed.
#[derive(Debug, PartialEq, Eq)]
struct Masters {
    /// The first slot each serves.
    first_slots: Vec<Slot>,
    /// Where each is (host, port).
    addresses: Vec<(String, u16)>,
    /// How many slots they serve together.
    covered: u32,
}

fn parse_masters(nodes: &str) -> Masters {
    let mut first_slots = Vec::new();
    let mut addresses = Vec::new();
    let mut covered = 0u32;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(flags) = fields.get(2) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") || flags.contains(&"fail") || flags.contains(&"noaddr") {
            continue;
        }
        // Fields 8.. are slots or ranges (`0-5460`, `5461`), or slots
        // being migrated (`[…]`).
        let mut first = None;
        for range in fields.iter().skip(8).filter(|r| !r.starts_with('[')) {
            let mut ends = range.splitn(2, '-').map(str::parse::<u16>);
            let Some(Ok(start)) = ends.next() else {
                continue;
            };
            let end = match ends.next() {
                None => start,
                Some(Ok(end)) if end >= start => end,
                Some(_) => continue,
            };
            if first.is_none() {
                first = Slot::new(start);
            }
            covered += u32::from(end - start) + 1;
        }
        // `host:port@cport[,hostname]`
        let address = fields.get(1).and_then(|field| {
            let (host, port) = field.split('@').next()?.rsplit_once(':')?;
            Some((host.to_owned(), port.parse::<u16>().ok()?))
        });
        if let (Some(slot), Some(address)) = (first, address) {
            first_slots.push(slot);
            addresses.push(address);
        }
    }
    // In one order whatever node answered: two answers compare equal when
    // the same masters serve.
    addresses.sort();
    Masters {
        first_slots,
        addresses,
        covered: covered.min(SLOTS),
    }
}

impl fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClusterStore")
            .field("connected", &self.cached().is_some())
            .field("fill_feed", &self.feed.key)
            .finish()
    }
}

impl Store for RedisClusterStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let value: Option<Vec<u8>> = self.query(rds::cmd("GET").arg(key)).await?;
            Ok(value.map(Bytes::from))
        })
    }

    fn put<'a>(&'a self, key: &'a str, record: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = rds::cmd("SET");
            cmd.arg(key)
                .arg(record.as_ref())
                .arg("PX")
                .arg(ttl_millis(ttl));
            self.query::<()>(&cmd).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // The entry and its lease share a hash tag: one slot, one command.
            let mut cmd = rds::cmd("UNLINK");
            cmd.arg(key).arg(lease_key(key));
            self.query::<()>(&cmd).await?;
            // The feed is in a slot of its own: a second command.
            self.query::<()>(&xadd_key_change(&self.feed.key, key))
                .await
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
            let lease = lease_key(key);
            let ttl = ttl_millis(ttl);
            // The lease key is the same whoever holds it: joining the sets
            // before taking it is harmless when the lease is taken already.
            self.join_sets(&lease, sets, ttl).await?;
            let mut cmd = rds::cmd("SET");
            cmd.arg(&lease).arg(token).arg("NX").arg("PX").arg(ttl);
            let reply: Option<String> = self.query(&cmd).await?;
            if reply.is_none() {
                return Ok(false);
            }
            if let Err(err) = self.join_sets(&lease, sets, ttl).await {
                // Not findable by an invalidation: give it up rather than
                // rebuild under a lease that cannot be fenced.
                let _ = self.release_lease(key, token).await;
                return Err(err);
            }
            Ok(true)
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
            let ttl = ttl_millis(fill.ttl);
            // Joined before the store, so that an invalidation of a set
            // that runs while the entry is stored finds it.
            self.join_sets(fill.key, fill.sets, ttl).await?;
            let mut conn = self.connection().await?;
            let stored: i64 = FENCED_STORE
                .key(fill.key)
                .key(lease_key(fill.fence_key()))
                .arg(fill.token.unwrap_or(""))
                .arg(fill.record.as_ref())
                .arg(ttl)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.fail(e))?;
            if stored != 1 {
                return Ok(false);
            }
            // Joined again, in case an invalidation emptied a set between
            // the first joins and the store.
            if let Err(err) = self.join_sets(fill.key, fill.sets, ttl).await {
                // An entry its sets may not find must not stay.
                let _ = self.query::<()>(rds::cmd("UNLINK").arg(fill.key)).await;
                return Err(err);
            }
            let mut xadd = rds::cmd("XADD");
            xadd.arg(&self.feed.key)
                .arg("MAXLEN")
                .arg("~")
                .arg(FILL_FEED_MAXLEN)
                .arg("*")
                .arg("k")
                .arg(fill.key);
            if let Err(err) = self.query::<()>(&xadd).await {
                // Waiters poll too: a lost notification only costs latency.
                tracing::debug!(error = %err, "tower-fence: fill feed append failed");
            }
            Ok(true)
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
            let keys = vec![lease_key(key), key.to_owned()];
            let changed = self.remove(keys, Removal::MarkStale { at_ms }).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masters_and_their_first_slots_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected [5461->-a1] 5461-10922
c3 127.0.0.1:7002@17002 master,fail - 0 1 3 connected 10923-16383
d4 127.0.0.1:7003@17003 slave a1 0 1 1 connected
e5 127.0.0.1:7004@17004 master - 0 1 5 connected 16000
f6 127.0.0.1:7005@17005 master - 0 1 6 connected
";
        let masters = parse_masters(nodes);
        assert_eq!(
            masters.first_slots,
            vec![
                Slot::new(0).unwrap(),
                Slot::new(5461).unwrap(),
                Slot::new(16000).unwrap()
            ]
        );
        assert_eq!(masters.addresses[0], ("127.0.0.1".to_owned(), 7000));
        assert_eq!(masters.addresses.len(), 3);
        // The failed master's 10923-16383 are not covered.
        assert_eq!(masters.covered, 5461 + 5462 + 1);
        let healthy = nodes.replace("master,fail", "master");
        assert_eq!(parse_masters(&healthy).covered, SLOTS);
    }
}
