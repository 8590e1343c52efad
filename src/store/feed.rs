//! What the two Redis stores share: the fill feed (its waiters, its
//! watchers of changes and its reader), the lease scripts, the step sizes
//! of scans and TTL conversion.
//!
//! The feed is a capped stream. A fill appends `k` = key; an invalidation
//! appends `i` = key (one key and its lease) or `m` = what it matched (a
//! prefix, a tag's set: keys not named). Readers that know no field skip
//! the entry, so a feed can carry new kinds of change to old readers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bb8_redis::redis::aio::ConnectionLike;
use bb8_redis::redis::streams::{StreamRangeReply, StreamReadReply};
use bb8_redis::redis::{self, RedisResult, Script};
use tokio::sync::watch;

use super::{Change, ChangeWatcher, FillSubscription};

/// Length the fill feed is trimmed to (approximately).
pub(super) const FILL_FEED_MAXLEN: usize = 10_000;

/// How long one blocking read of the fill feed waits for news.
pub(super) const FILL_FEED_BLOCK_MS: u64 = 1_000;

/// `COUNT` hint of each `SCAN` step: about a millisecond of Redis's time
/// per step over a million keys, so other clients wait at most that long.
pub(super) const SCAN_COUNT: usize = 500;

/// `COUNT` hint of each `SSCAN` step. Every member read is unlinked in the
/// same step, and `UNLINK` frees small values synchronously: 250 keeps one
/// step under a millisecond.
pub(super) const SSCAN_COUNT: usize = 250;

pub(super) static EXTEND_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/extend_lease.lua")));
pub(super) static RELEASE_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/release_lease.lua")));

/// A TTL in whole milliseconds, at least one (`PX 0` is an error).
pub(super) fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The fill notifications this process waits for.
#[derive(Debug)]
pub(super) struct FillFeed {
    /// The stream the fills are appended to.
    pub(super) key: String,
    waiters: Mutex<HashMap<String, watch::Sender<u64>>>,
    reading: AtomicBool,
    watchers: Mutex<Watchers>,
}

/// Who hears of changes, and whether the reader reads from a known
/// position (so that a new watcher hears [`Change::Resumed`] at once).
#[derive(Debug, Default)]
struct Watchers {
    live: bool,
    list: Vec<ChangeWatcher>,
}

/// The field of a feed entry naming a filled key.
const FILLED: &str = "k";
/// The field of a feed entry naming an invalidated key.
const INVALIDATED_KEY: &str = "i";
/// The field of a feed entry telling of keys not named (a pattern, a set).
const INVALIDATED_MANY: &str = "m";

/// `XADD` of an invalidation of `key` to the feed `stream`.
pub(super) fn xadd_key_change(stream: &str, key: &str) -> redis::Cmd {
    xadd(stream, INVALIDATED_KEY, key)
}

/// `XADD` of an invalidation of keys not named (`what`: a glob or a set)
/// to the feed `stream`.
pub(super) fn xadd_many_changed(stream: &str, what: &str) -> redis::Cmd {
    xadd(stream, INVALIDATED_MANY, what)
}

fn xadd(stream: &str, field: &str, value: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(FILL_FEED_MAXLEN)
        .arg("*")
        .arg(field)
        .arg(value);
    cmd
}

impl FillFeed {
    pub(super) fn new(key: String) -> Self {
        FillFeed {
            key,
            waiters: Mutex::new(HashMap::new()),
            reading: AtomicBool::new(false),
            watchers: Mutex::new(Watchers::default()),
        }
    }

    fn watchers(&self) -> MutexGuard<'_, Watchers> {
        self.watchers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds `watcher`; tells it [`Change::Resumed`] at once when the feed
    /// is read already.
    pub(super) fn watch(&self, watcher: ChangeWatcher) {
        let mut watchers = self.watchers();
        if watchers.live && !watcher.notify(Change::Resumed) {
            return;
        }
        watchers.list.push(watcher);
    }

    /// Tells every watcher of `change`, forgetting those that are gone.
    /// Under the lock, so that a watcher added meanwhile hears of the
    /// feed's state and every change after it, in order.
    fn changed(&self, change: Change<'_>) {
        let mut watchers = self.watchers();
        match change {
            Change::Lost => {
                if !watchers.live {
                    return;
                }
                watchers.live = false;
            }
            Change::Resumed => watchers.live = true,
            _ => {}
        }
        watchers.list.retain(|watcher| watcher.notify(change));
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A subscription woken by the next fill of `key`.
    pub(super) fn subscribe(&self, key: &str) -> FillSubscription {
        let rx = self
            .waiters()
            .entry(key.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        FillSubscription::new(rx)
    }

    fn notify(&self, key: &str) {
        if let Some(tx) = self.waiters().get(key) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Forgets keys nobody waits for any more.
    fn sweep(&self) {
        self.waiters().retain(|_, tx| tx.receiver_count() > 0);
    }

    /// Spawns the reader of `feed` once (inside a Tokio runtime), on
    /// connections from `connect`.
    pub(super) fn start_reader<C, F, Fut>(feed: &Arc<FillFeed>, connect: F)
    where
        C: ConnectionLike + Send + 'static,
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = RedisResult<C>> + Send + 'static,
    {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if feed.reading.swap(true, Ordering::AcqRel) {
            return;
        }
        handle.spawn(read(Arc::downgrade(feed), connect));
    }
}

/// Reads the fill feed on a connection of its own (its reads block) and
/// wakes this process's waiters, until every store sharing `feed` is gone.
/// Reconnects with a growing pause when Redis is away, resuming after the
/// last entry read.
async fn read<C, F, Fut>(feed: Weak<FillFeed>, mut connect: F)
where
    C: ConnectionLike + Send,
    F: FnMut() -> Fut,
    Fut: Future<Output = RedisResult<C>>,
{
    let mut last_id: Option<String> = None;
    let mut pause = Duration::from_millis(50);
    loop {
        let Some(stream) = feed.upgrade().map(|f| f.key.clone()) else {
            return;
        };
        let mut conn = match connect().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::debug!(error = %err, "tower-fence: fill feed reader cannot connect");
                if let Some(feed) = feed.upgrade() {
                    feed.changed(Change::Lost);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if last_id.is_none() {
            // Start after the newest entry: what was filled before this
            // process waited is found by reading the entry itself.
            let newest: RedisResult<StreamRangeReply> = redis::cmd("XREVRANGE")
                .arg(&stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await;
            match newest {
                Ok(reply) => {
                    last_id = Some(
                        reply
                            .ids
                            .first()
                            .map_or_else(|| "0-0".to_owned(), |e| e.id.clone()),
                    );
                }
                Err(err) => {
                    tracing::debug!(error = %err, "tower-fence: fill feed reader cannot read");
                    if let Some(feed) = feed.upgrade() {
                        feed.changed(Change::Lost);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        pause = Duration::from_millis(50);
        // Read from a known position again: whatever was kept while the
        // feed was not read may have missed changes, so watchers drop it.
        match feed.upgrade() {
            Some(feed) => feed.changed(Change::Resumed),
            None => return,
        }
        loop {
            let from = last_id.clone().unwrap_or_else(|| "$".to_owned());
            let reply: RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(512)
                .arg("BLOCK")
                .arg(FILL_FEED_BLOCK_MS)
                .arg("STREAMS")
                .arg(&stream)
                .arg(&from)
                .query_async(&mut conn)
                .await;
            let Some(feed) = feed.upgrade() else {
                return;
            };
            match reply {
                Ok(Some(reply)) => {
                    for key in reply.keys {
                        for entry in key.ids {
                            if let Some(filled) = entry.get::<String>(FILLED) {
                                // Copies go before waiters wake and read.
                                feed.changed(Change::Key(&filled));
                                feed.notify(&filled);
                            } else if let Some(key) = entry.get::<String>(INVALIDATED_KEY) {
                                feed.changed(Change::Key(&key));
                            } else if entry.map.contains_key(INVALIDATED_MANY) {
                                feed.changed(Change::Many);
                            }
                            last_id = Some(entry.id);
                        }
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "tower-fence: fill feed read failed; reconnecting");
                    feed.changed(Change::Lost);
                    tokio::time::sleep(pause).await;
                    break;
                }
            }
            feed.sweep();
        }
    }
}
