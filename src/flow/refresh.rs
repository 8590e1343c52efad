//! Background refreshes (XFetch early refresh, grace): one per key in the
//! process, and only under the key's lease, so one in the whole fleet. The
//! entry stays until a new one may be stored.

use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

use http::Request;

use crate::entry::Entry;
use crate::flow::lead::keep_lease;
use crate::flow::origin::{self, Head};
use crate::flow::settle::{self, Filled};
use crate::flow::{Inner, Keyed, SendBody};
use crate::shared::Landing;
use crate::store_client::Found;

/// Starts a background refresh of `keyed`'s entry `current`, with the
/// readied `svc`, unless one runs in this process.
pub(crate) fn spawn<S, B, RB>(svc: S, req: Request<B>, keyed: Keyed, current: Arc<Entry>)
where
    S: Inner<B, RB>,
    B: Send + 'static,
    RB: SendBody,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let shared = keyed.shared.clone();
    let Some(lead) = shared
        .flights
        .try_lead_refresh(&keyed.key.shared(), keyed.epoch)
    else {
        return;
    };
    let refresh = async move {
        let mut svc = svc;
        let mut req = req;
        let key = &keyed.key;
        let prepared = origin::prepare(&shared, &mut req, Some(&current));
        let fence = match settle::take_lease(&shared, key, &prepared.lease_sets).await {
            Ok(Some(fence)) => fence,
            _ => return,
        };
        // Re-check: a refresh (here or in another process) that stored
        // after this request read `current` and before it took the lease
        // has done the work already.
        if let Found::Entry(stored) = shared.store.read(key.as_str()).await {
            if stored.stored_at_ms > current.stored_at_ms {
                settle::release(&shared, key, &fence).await;
                return;
            }
        }
        shared.bump(|c| &c.refreshes);
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + shared.rebuild_timeout;
        let answer = keep_lease(&shared, key, &fence, deadline, svc.call(req)).await;
        let now_ms = shared.clock.now_ms();
        let (entry, tags) =
            match origin::classify(&keyed, answer, Some(&current), true, now_ms, started) {
                Head::NotModified {
                    entry,
                    storable: true,
                    tags,
                } => (entry, tags),
                Head::Share {
                    parts,
                    body,
                    freshness: Some(freshness),
                    tags,
                } => match origin::read(body, shared.max_body_size, deadline).await {
                    Some(recorded) => {
                        let entry = origin::entry_of(
                            &parts,
                            recorded,
                            Some(freshness),
                            &prepared.request_headers,
                            now_ms,
                            started,
                        );
                        (entry, tags)
                    }
                    None => {
                        settle::release(&shared, key, &fence).await;
                        return;
                    }
                },
                // The origin failed or the response may not be stored: keep
                // serving what is there.
                _ => {
                    settle::release(&shared, key, &fence).await;
                    return;
                }
            };
        let filled =
            settle::fill_or_release(&keyed, &prepared.path, &entry, &fence, true, &tags).await;
        if filled == Filled::Stored {
            lead.land(Landing::Response(Arc::new(entry)));
        }
    };
    // The refresh carries the span of the request that started it.
    runtime.spawn(refresh.instrument(tracing::Span::current()));
}
