//! What a lookup found means for the request: serve it (fresh, or stale
//! while one refresh runs), look its variant up, or go to the origin.

use std::sync::Arc;

use http::HeaderMap;

use crate::entry::{flags, Entry};
use crate::flow::Keyed;
use crate::key::{self, CacheKey};
use crate::policy::{self, Usability};
use crate::respond::vary_matches;
use crate::status::{CacheStatus, Fwd};
use crate::store_client::Found;

/// What to do after a lookup. Moved once per request, so the size
/// difference between variants costs nothing worth a box (a box would be
/// one more allocation per hit).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Verdict {
    /// Answer with `entry`; with `refresh`, start one background refresh
    /// of it.
    Serve {
        entry: Entry,
        status: CacheStatus,
        refresh: bool,
    },
    /// The URL's responses vary: look the request's variant up.
    Variant(CacheKey),
    /// `only-if-cached` and nothing usable is stored.
    OnlyIfCached,
    /// The store failed and the request may not share a rebuild: pass it.
    Pass(CacheStatus),
    /// Go to the origin.
    Miss(Miss),
}

/// A miss: why, and what the cache still has.
#[derive(Debug)]
pub(crate) struct Miss {
    pub(crate) fwd: Fwd,
    /// The stored entry, if stale (or to be validated): revalidated by the
    /// rebuild, served when the origin fails (stale-if-error).
    pub(crate) stale: Option<Arc<Entry>>,
    /// Set when the lookup failed: the rebuild stores nothing, and says
    /// why in `Cache-Status`.
    pub(crate) store_failure: Option<&'static str>,
}

/// Decides what `found` means for a request with `headers`.
pub(crate) fn after_lookup(
    found: Found,
    keyed: &Keyed,
    headers: &HeaderMap,
    now_ms: u64,
) -> Verdict {
    let shared = &keyed.shared;
    let is_variant = keyed.key != keyed.base;
    let mut store_failure = None;
    let (fwd, stale) = match found {
        Found::Vary(names) if !is_variant => {
            return Verdict::Variant(key::variant(&keyed.base, &names, headers));
        }
        Found::Vary(_) => (Fwd::VaryMiss, None),
        Found::Nothing if is_variant => (Fwd::VaryMiss, None),
        Found::Failed(err) => {
            // Fail open, but still one request per key in this process: a
            // store outage must not become an origin stampede.
            shared.bump(|c| &c.bypasses);
            if !keyed.may_share() {
                return Verdict::Pass(CacheStatus::bypass(err.detail()));
            }
            store_failure = Some(err.detail());
            (Fwd::Bypass, None)
        }
        Found::Nothing => (Fwd::UriMiss, None),
        Found::Entry(entry) if !vary_matches(&entry, headers) => (Fwd::VaryMiss, None),
        Found::Entry(entry) => {
            match policy::usability(
                &entry,
                &keyed.facts,
                keyed.overrides.keyed_by_credential,
                now_ms,
            ) {
                Usability::Fresh => {
                    shared.bump(|c| &c.hits);
                    let beta = shared.xfetch_beta;
                    let refresh =
                        beta > 0.0 && entry.xfetch_due(now_ms, beta, 1.0 - fastrand::f64());
                    if refresh {
                        shared.bump(|c| &c.early_refreshes);
                    }
                    let ttl = entry.ttl_ms(now_ms).div_euclid(1000);
                    return Verdict::Serve {
                        entry,
                        status: CacheStatus::hit(ttl),
                        refresh,
                    };
                }
                Usability::StaleAccepted => {
                    shared.bump(|c| &c.stale_hits);
                    let ttl = entry.ttl_ms(now_ms).div_euclid(1000);
                    return Verdict::Serve {
                        entry,
                        status: CacheStatus::stale(ttl, "max-stale"),
                        refresh: false,
                    };
                }
                Usability::NotShared => (Fwd::Request, None),
                Usability::Validate => {
                    let expired = !entry.is_fresh(now_ms);
                    let facts = &keyed.facts;
                    let grace = expired
                        && entry.in_grace(now_ms)
                        && !entry.has(flags::REVALIDATE)
                        && !facts.no_cache
                        && facts.max_age.is_none()
                        && facts.min_fresh.is_none();
                    if grace {
                        // Stale-while-revalidate: serve what is here,
                        // refresh (revalidate) behind.
                        shared.bump(|c| &c.stale_hits);
                        let ttl = entry.ttl_ms(now_ms).div_euclid(1000);
                        return Verdict::Serve {
                            entry,
                            status: CacheStatus::stale(ttl, "stale-while-revalidate"),
                            refresh: true,
                        };
                    }
                    let fwd = if expired { Fwd::Stale } else { Fwd::Request };
                    (fwd, Some(Arc::new(entry)))
                }
            }
        }
    };
    if keyed.facts.only_if_cached {
        return Verdict::OnlyIfCached;
    }
    if store_failure.is_none() {
        shared.bump(|c| &c.misses);
    }
    Verdict::Miss(Miss {
        fwd,
        stale,
        store_failure,
    })
}
