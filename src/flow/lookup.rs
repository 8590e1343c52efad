//! Reading a key. Each request reads for itself by default; with
//! [`share_lookups`](crate::FenceLayerBuilder::share_lookups) one store read
//! per key runs at a time, so a burst for a hot (or cold) key costs the
//! store one `GET`, not one per request. A request joins only a read that
//! started in its write epoch or later (a write of another process it
//! cannot see: hence the opt-in).

use std::sync::Arc;

use crate::key::CacheKey;
use crate::shared::Shared;
use crate::singleflight::{Role, Waited};
use crate::store_client::Found;

/// Looks `key` up at once when the store can answer without waiting (see
/// [`Store::get_now`](crate::store::Store::get_now)): no read is shared
/// then, since each is as fresh as any running one.
pub(crate) fn lookup_now(shared: &Shared, key: &CacheKey) -> Option<Found> {
    shared.store.read_now(key.as_str())
}

/// Looks `key` up for a request that arrived in write epoch `epoch`.
pub(crate) async fn lookup(shared: Arc<Shared>, key: CacheKey, epoch: u64) -> Found {
    if !shared.share_lookups {
        return shared.store.read(key.as_str()).await;
    }
    let name = key.shared();
    match shared.lookups.join(&name, epoch) {
        Role::Leader(lead) => {
            let found = shared.store.read(key.as_str()).await;
            // Copy the result only for requests that followed (usually
            // none, on a hit); one that joins after this check reads for
            // itself.
            if lead.has_waiters() {
                lead.land(Arc::new(found.share()));
            }
            found
        }
        Role::Waiter(wait) => match wait.landing(None).await {
            Waited::Landed(found) => found.share(),
            Waited::Retry | Waited::TimedOut(_) => shared.store.read(key.as_str()).await,
        },
        Role::Full => shared.store.read(key.as_str()).await,
    }
}
