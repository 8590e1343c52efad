//! What a wait for another request's rebuild came to.

use std::sync::Arc;

use http::HeaderMap;

use crate::entry::Entry;
use crate::respond::vary_matches;
use crate::shared::{Landing, Shared};
use crate::singleflight::{Wait, Waited};
use crate::status::{CacheStatus, Fwd};

/// How often a request joins a flight whose leader vanished before it goes
/// to the inner service itself.
pub(crate) const MAX_JOINS: u8 = 3;

/// What to do after a wait.
#[derive(Debug)]
pub(crate) enum AfterWait {
    /// Answer with the leader's entry (or the stale one).
    Serve {
        entry: Arc<Entry>,
        status: CacheStatus,
    },
    /// The leader's call to the inner service failed: answer `502`.
    Failed(CacheStatus),
    /// The leader vanished: join the key's flight again.
    Rejoin,
    /// The wait ran out and nothing stale may be served: take the rebuild
    /// over from the flight given up on (one request does; the others wait
    /// for it).
    TakeOver(Wait<Landing>),
    /// The leader's answer is not for this request (uncacheable, another
    /// variant), or leaders kept vanishing: ask the inner service alone.
    Alone,
}

/// Decides what `waited` means for a request with `headers` that has
/// joined `joins` flights so far, holding the `stale` entry if any.
pub(crate) fn after_wait(
    shared: &Shared,
    waited: Waited<Landing>,
    headers: &HeaderMap,
    stale: Option<&Arc<Entry>>,
    fwd: Fwd,
    joins: u8,
    now_ms: u64,
) -> AfterWait {
    match waited {
        Waited::Landed(Landing::Response(entry)) if vary_matches(&entry, headers) => {
            shared.bump(|c| &c.collapsed);
            let status = CacheStatus::collapsed(fwd, entry.status.as_u16());
            AfterWait::Serve { entry, status }
        }
        Waited::Landed(Landing::Failed) => {
            shared.bump(|c| &c.shared_errors);
            match stale.filter(|s| s.usable_on_error(now_ms)) {
                Some(stale) => AfterWait::Serve {
                    entry: stale.clone(),
                    status: stale_status(stale, now_ms, "stale-if-error"),
                },
                None => AfterWait::Failed(CacheStatus {
                    collapsed: true,
                    detail: Some("origin-error"),
                    ..CacheStatus::forward(fwd)
                }),
            }
        }
        Waited::Landed(_) => AfterWait::Alone,
        Waited::Retry if joins < MAX_JOINS => AfterWait::Rejoin,
        Waited::Retry => AfterWait::Alone,
        Waited::TimedOut(wait) => {
            shared.bump(|c| &c.wait_timeouts);
            match stale.filter(|s| s.in_grace(now_ms) || s.usable_on_error(now_ms)) {
                Some(stale) => AfterWait::Serve {
                    entry: stale.clone(),
                    status: stale_status(stale, now_ms, "wait-timeout"),
                },
                None => AfterWait::TakeOver(wait),
            }
        }
    }
}

fn stale_status(stale: &Entry, now_ms: u64, detail: &'static str) -> CacheStatus {
    CacheStatus::stale(stale.ttl_ms(now_ms).div_euclid(1000), detail)
}
