//! Storing a rebuilt entry, fenced by the lease or permit its rebuild took
//! before it called the origin: an invalidation that ran meanwhile removed
//! that lease, and then nothing is stored (the memcache lease idea). No
//! fill is ever unfenced.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use http::{HeaderMap, HeaderName};

use crate::entry::{Entry, Record};
use crate::flow::Keyed;
use crate::grpc;
use crate::invalidate;
use crate::key::{self, CacheKey};
use crate::shared::Shared;
use crate::store::Fill;

/// What allows a rebuild to store its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fence {
    /// The key's lease: this rebuild leads it in the whole fleet.
    Lease { token: String },
    /// A permit: a lease of its own, taken by a request that rebuilds
    /// without leading (its flight's wait ran out, a personal request, a
    /// hit-for-miss key). It is removed by the same invalidations.
    Permit { key: String, token: String },
    /// Nothing: the store could not be asked; the result is not stored.
    None,
}

impl Fence {
    /// The lease this fence holds for `key`'s rebuild: the key whose lease
    /// it is, and the token.
    pub(crate) fn held<'a>(&'a self, key: &'a str) -> Option<(&'a str, &'a str)> {
        match self {
            Fence::Lease { token } => Some((key, token)),
            Fence::Permit { key, token } => Some((key, token)),
            Fence::None => None,
        }
    }

    /// Whether this fence allows storing anything.
    pub(crate) fn allows_store(&self) -> bool {
        !matches!(self, Fence::None)
    }
}

/// Takes the lease of `key`: `Ok(Some)` when held, `Ok(None)` when
/// another request holds it.
pub(crate) async fn take_lease(
    shared: &Shared,
    key: &CacheKey,
    lease_sets: &[String],
) -> Result<Option<Fence>, crate::StoreError> {
    let token = crate::flow::new_token();
    let taken = shared
        .store
        .try_lease(key.as_str(), &token, shared.lease_ttl, lease_sets)
        .await?;
    Ok(taken.then_some(Fence::Lease { token }))
}

/// Takes a permit to store a rebuild of `key` that does not lead its
/// flight; [`Fence::None`] when the store cannot be asked.
pub(crate) async fn take_permit(shared: &Shared, key: &CacheKey, lease_sets: &[String]) -> Fence {
    let token = crate::flow::new_token();
    let permit = format!("{}.p{}", key.as_str(), &token[..16]);
    match shared
        .store
        .try_lease(&permit, &token, shared.lease_ttl, lease_sets)
        .await
    {
        Ok(true) => Fence::Permit { key: permit, token },
        Ok(false) | Err(_) => Fence::None,
    }
}

/// Gives the lease or permit back (the rebuild stores nothing).
pub(crate) async fn release(shared: &Shared, key: &CacheKey, fence: &Fence) {
    if let Some((lease, token)) = fence.held(key.as_str()) {
        shared.store.release_lease(lease, token).await;
    }
}

/// What became of a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filled {
    Stored,
    /// The lease was lost (an invalidation took it, or it expired): the
    /// result may be older than a write, and is not to be shared.
    FencedOut,
    /// The store failed, or the fence allowed nothing.
    NotStored,
}

/// Stores `entry` under `key` (the URL's key `base`, or one of its
/// variants), fenced by `fence`, joining `sets`.
///
/// A response that varies, stored under the URL's own key, goes to its
/// variant's key, and the URL's key gets a vary stub naming the headers.
/// The variant is written first and the stub, fenced, second: if the fence
/// was lost meanwhile the variant is removed again, so an invalidation
/// during the rebuild leaves nothing behind.
pub(crate) async fn fill(
    shared: &Shared,
    base: &CacheKey,
    key: &CacheKey,
    entry: &Entry,
    fence: &Fence,
    sets: &[String],
    declared_vary: &[HeaderName],
) -> Filled {
    if !fence.allows_store() {
        return Filled::NotStored;
    }
    // A gRPC call that failed (or a stream) is never stored.
    if !grpc::storable(entry) {
        release(shared, key, fence).await;
        return Filled::NotStored;
    }
    let ttl = entry.store_ttl(shared.clock.now_ms(), shared.keep_ms());
    let names: Vec<HeaderName> = entry.vary.iter().map(|(name, _)| name.clone()).collect();
    // Headers the route declared to vary on are in the key already.
    let filled = if names.iter().all(|name| declared_vary.contains(name)) {
        write(
            shared,
            key,
            entry.encode(key.as_str()),
            ttl,
            Some((key, fence)),
            sets,
        )
        .await
    } else if key != base {
        // Already the variant's key (the stub was found): refresh the stub.
        let stub = Record::encode_vary(&names, base.as_str());
        let record = entry.encode(key.as_str());
        let filled = write(shared, key, record, ttl, Some((key, fence)), sets).await;
        if filled == Filled::Stored {
            write(shared, base, stub, ttl, None, &[]).await;
        }
        filled
    } else {
        let request_values: HeaderMap = entry
            .vary
            .iter()
            .filter_map(|(name, value)| Some((name.clone(), value.clone()?)))
            .collect();
        let variant = key::variant(base, &names, &request_values);
        let stub = Record::encode_vary(&names, base.as_str());
        let record = entry.encode(variant.as_str());
        match write(shared, &variant, record, ttl, None, sets).await {
            Filled::Stored => {
                // The stub joins no set: an invalidation removes the
                // variants (they joined the sets), and a stub whose variant
                // is gone is a vary-miss.
                let filled = write(shared, base, stub, ttl, Some((base, fence)), &[]).await;
                if filled != Filled::Stored {
                    let _ = shared.store.delete(variant.as_str()).await;
                }
                filled
            }
            other => other,
        }
    };
    if filled == Filled::Stored {
        shared.hit_for_miss.invalidate(base.as_str());
        shared.hit_for_miss.invalidate(key.as_str());
    }
    filled
}

async fn write(
    shared: &Shared,
    key: &CacheKey,
    record: bytes::Bytes,
    ttl: Duration,
    fenced: Option<(&CacheKey, &Fence)>,
    sets: &[String],
) -> Filled {
    let mut fill = Fill::new(key.as_str(), record, ttl).joining(sets);
    if let Some((leased, fence)) = fenced {
        match fence.held(leased.as_str()) {
            Some((lease, token)) => fill = fill.fenced_by_lease_of(lease, token),
            None => return Filled::NotStored,
        }
    }
    match shared.store.fill(fill).await {
        Ok(true) => {
            shared.bump(|c| &c.stores);
            Filled::Stored
        }
        Ok(false) => {
            shared.bump(|c| &c.fenced_out);
            tracing::debug!(
                key = key.as_str(),
                "tower-fence: lease lost during the rebuild; not stored"
            );
            Filled::FencedOut
        }
        Err(_) => Filled::NotStored,
    }
}

/// Settles a rebuild of `keyed` that produced `entry`: stores it (joining
/// the sets of `tags` and of the request `path`) when `storable`, else
/// gives the fence back.
pub(crate) async fn fill_or_release(
    keyed: &Keyed,
    path: &str,
    entry: &Entry,
    fence: &Fence,
    storable: bool,
    tags: &[String],
) -> Filled {
    let shared = &keyed.shared;
    if !storable {
        release(shared, &keyed.key, fence).await;
        return Filled::NotStored;
    }
    let sets = invalidate::fill_sets(shared, path, tags, &keyed.overrides.tags);
    fill(
        shared,
        &keyed.base,
        &keyed.key,
        entry,
        fence,
        &sets,
        &keyed.overrides.declared_vary,
    )
    .await
}

/// [`fill`] in a background task (for responses recorded as their client
/// read them). A store that completes at once (the memory store) is done
/// before the client sees the end of the body, so the next request finds
/// the entry. Without a Tokio runtime nothing is stored.
pub(crate) fn fill_behind(
    shared: Arc<Shared>,
    base: CacheKey,
    key: CacheKey,
    entry: Entry,
    fence: Fence,
    sets: Vec<String>,
    declared_vary: Vec<HeaderName>,
) {
    use std::future::Future;
    use std::task::{Context, Waker};
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no tokio runtime; response not stored");
        return;
    };
    let mut work = Box::pin(async move {
        fill(&shared, &base, &key, &entry, &fence, &sets, &declared_vary).await;
    });
    let mut cx = Context::from_waker(Waker::noop());
    if work.as_mut().poll(&mut cx).is_pending() {
        handle.spawn(work.instrument(tracing::Span::current()));
    }
}
