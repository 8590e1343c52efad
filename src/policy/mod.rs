//! What may be cached, and for how long.
//!
//! tower-fence is a shared cache (RFC 9111 §1): what it stores for one client
//! it serves to others. This module decides, for a request, whether the
//! cache is consulted at all, and for a response, whether it may be stored
//! and until when it is fresh. It knows nothing of tower; its functions take
//! the current time as an argument so that they are tested without a clock.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode};

mod cache_control;
pub mod rules;
pub(crate) mod structured;

use cache_control::delta_seconds;
pub(crate) use cache_control::{CacheControl, Unparseable};

pub(crate) use crate::entry::Freshness;
use crate::entry::{flags, unix_ms, Entry};

/// Status codes a response may be cached with under the default TTL when it
/// carries no explicit freshness: the heuristically cacheable codes of
/// RFC 9110 §15.1, without `206` (ranges are not cached).
pub const DEFAULT_CACHEABLE_STATUSES: [StatusCode; 11] = [
    StatusCode::OK,
    StatusCode::NON_AUTHORITATIVE_INFORMATION,
    StatusCode::NO_CONTENT,
    StatusCode::MULTIPLE_CHOICES,
    StatusCode::MOVED_PERMANENTLY,
    StatusCode::PERMANENT_REDIRECT,
    StatusCode::NOT_FOUND,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::GONE,
    StatusCode::URI_TOO_LONG,
    StatusCode::NOT_IMPLEMENTED,
];

/// The layer settings the policy reads.
#[derive(Debug, Clone)]
pub(crate) struct PolicyConfig {
    pub(crate) default_ttl: Duration,
    /// Heuristic freshness (RFC 9111 §4.2.2), opt-in: this fraction of the
    /// time since `Last-Modified`, at most this long, instead of the
    /// default TTL for responses that state no freshness.
    pub(crate) heuristic: Option<(f64, Duration)>,
    /// Stale-while-revalidate window when the response states none.
    pub(crate) grace: Duration,
    /// Stale-if-error window when the response states none.
    pub(crate) stale_if_error: Duration,
    pub(crate) cacheable_statuses: Vec<StatusCode>,
    /// Request headers that, like `Cookie`, may make a response personal
    /// (`FenceLayerBuilder::credential_header`).
    pub(crate) credential_headers: Vec<HeaderName>,
}

/// How far a client's own `Cache-Control` (and `Pragma`) is obeyed.
///
/// A shared cache serves many clients; a client that sends `no-cache` or
/// `max-age=0` on every request makes the cache forward (revalidate) each
/// of them. [`Obey`](Self::Obey) follows RFC 9111 §5.2.1 to the letter;
/// [`IgnoreRevalidation`](Self::IgnoreRevalidation) is what many CDNs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientCacheControl {
    /// Honour `no-cache`, `Pragma: no-cache`, `max-age`, `min-fresh`,
    /// `max-stale`, `only-if-cached` and `no-store`.
    #[default]
    Obey,
    /// Ignore the directives that force a trip to the origin (`no-cache`,
    /// `Pragma`, `max-age`, `min-fresh`); honour `max-stale`,
    /// `only-if-cached` and `no-store`.
    IgnoreRevalidation,
    /// Ignore every request directive.
    Ignore,
}

/// What a request asks of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RequestFacts {
    /// The request carries `Authorization` (RFC 9111 §3.5).
    pub(crate) authorized: bool,
    /// The request carries `Cookie` or one of the layer's credential
    /// headers: its response may be personal, as with `Authorization`.
    pub(crate) cookie: bool,
    /// The response may be stored (no `no-store`).
    pub(crate) may_store: bool,
    /// The stored response may not be used without validation.
    pub(crate) no_cache: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) max_stale: Option<u64>,
    pub(crate) min_fresh: Option<u64>,
    pub(crate) only_if_cached: bool,
}

impl RequestFacts {
    /// Whether this request's response may not be given to other requests
    /// unless the response says it may be shared (`public`, `s-maxage`;
    /// `must-revalidate` too for `Authorization`, RFC 9111 §3.5): it
    /// carries `Authorization` on a route that does not key by it, or
    /// `Cookie` (or a credential header) on a route that neither keys by
    /// cookie nor shares cookies.
    pub(crate) fn personal(&self, overrides: &Overrides) -> bool {
        (self.authorized && !overrides.keyed_by_credential)
            || (self.cookie && !overrides.cookies_shared)
    }
}

/// Whether a request carries `Cookie` or one of `config`'s credential
/// headers.
pub(crate) fn carries_cookie(config: &PolicyConfig, headers: &HeaderMap) -> bool {
    headers.contains_key(header::COOKIE)
        || config
            .credential_headers
            .iter()
            .any(|name| headers.contains_key(name))
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RequestPlan {
    /// Look the request up.
    Lookup(RequestFacts),
    /// Send the request to the inner service without consulting the cache;
    /// the reason goes to `Cache-Status` `detail`.
    Bypass(&'static str),
}

/// Decides whether a request may be answered from the cache, and reads its
/// directives (obeyed as far as `client` says) and credentials (`config`'s
/// credential headers).
pub(crate) fn plan_request(
    method: &Method,
    headers: &HeaderMap,
    client: ClientCacheControl,
    config: &PolicyConfig,
) -> RequestPlan {
    if method != Method::GET && method != Method::HEAD {
        return RequestPlan::Bypass("method");
    }
    // A `Range` request is looked up like any other: a stored full `200`
    // answers it (crate `range`), and a rebuild fetches the full response
    // (`206` is never stored).
    // A protocol switch (WebSocket) is not a cacheable exchange.
    if headers.contains_key(header::UPGRADE) {
        return RequestPlan::Bypass("upgrade");
    }
    let mut facts = RequestFacts {
        authorized: headers.contains_key(header::AUTHORIZATION),
        cookie: carries_cookie(config, headers),
        may_store: true,
        ..RequestFacts::default()
    };
    if client == ClientCacheControl::Ignore {
        return RequestPlan::Lookup(facts);
    }
    let has_cc = headers.contains_key(header::CACHE_CONTROL);
    if !has_cc && !headers.contains_key(header::PRAGMA) {
        return RequestPlan::Lookup(facts);
    }
    // A request `Cache-Control` that does not parse may say `no-store` or
    // `no-cache`: neither serve the request from the cache nor store its
    // response.
    let Ok(cc) = CacheControl::parse(headers.get_all(header::CACHE_CONTROL)) else {
        return RequestPlan::Bypass("cache-control");
    };
    // RFC 9111 §5.2.1.5: no-store forbids storing the response.
    facts.may_store = !cc.no_store;
    facts.max_stale = cc.max_stale;
    facts.only_if_cached = cc.only_if_cached;
    if client == ClientCacheControl::Obey {
        // RFC 9111 §5.4: `Pragma: no-cache` counts only without
        // `Cache-Control`.
        let pragma_no_cache = !has_cc
            && headers
                .get_all(header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| {
                    v.split(',')
                        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
                });
        facts.no_cache = cc.no_cache || pragma_no_cache;
        facts.max_age = cc.max_age;
        facts.min_fresh = cc.min_fresh;
    }
    RequestPlan::Lookup(facts)
}

/// Whether a stored entry may answer a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Usability {
    /// Fresh enough for the request: a hit.
    Fresh,
    /// Stale, but the request accepts it (`max-stale`).
    StaleAccepted,
    /// Must be validated with (or fetched again from) the origin first.
    Validate,
    /// May not answer this request at all (`Authorization`, RFC 9111 §3.5;
    /// `Cookie` or a credential header).
    NotShared,
}

/// Whether `entry` may answer a request with `facts` at all, fresh or not:
/// a request with `Authorization` (on a route not keyed by it) only from an
/// entry whose response allowed it (RFC 9111 §3.5), a request with `Cookie`
/// or a credential header only from an entry that was shareable among such
/// requests (`public`, `s-maxage`, or stored on a route that keys by cookie
/// or shares cookies: [`flags::COOKIE_OK`]).
pub(crate) fn may_answer(entry: &Entry, facts: &RequestFacts, keyed_by_credential: bool) -> bool {
    let authorization_ok =
        !facts.authorized || keyed_by_credential || entry.has(flags::AUTHORIZED_OK);
    let cookie_ok = !facts.cookie || entry.has(flags::COOKIE_OK);
    authorization_ok && cookie_ok
}

/// Decides whether `entry` may answer a request with `facts` at `now_ms`
/// (RFC 9111 §4.2, §5.2.1).
pub(crate) fn usability(
    entry: &Entry,
    facts: &RequestFacts,
    keyed_by_credential: bool,
    now_ms: u64,
) -> Usability {
    if !may_answer(entry, facts, keyed_by_credential) {
        return Usability::NotShared;
    }
    if facts.no_cache || entry.has(flags::REVALIDATE) {
        return Usability::Validate;
    }
    let age_ms = now_ms.saturating_sub(entry.stored_at_ms);
    if facts
        .max_age
        .is_some_and(|max| age_ms > max.saturating_mul(1000))
    {
        return Usability::Validate;
    }
    let remaining_ms = entry.ttl_ms(now_ms);
    if let Some(min_fresh) = facts.min_fresh {
        if remaining_ms < i64::try_from(min_fresh.saturating_mul(1000)).unwrap_or(i64::MAX) {
            return Usability::Validate;
        }
    }
    if remaining_ms > 0 {
        return Usability::Fresh;
    }
    if let Some(max_stale) = facts.max_stale {
        let stale_ms = remaining_ms.unsigned_abs();
        if !entry.has(flags::NO_STALE) && stale_ms <= max_stale.saturating_mul(1000) {
            return Usability::StaleAccepted;
        }
    }
    Usability::Validate
}

/// Per-route settings that take precedence over the layer's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Overrides {
    /// Tags every entry of the route joins.
    pub(crate) tags: Vec<String>,
    /// Request headers the route's responses are declared to vary on: they
    /// are part of the key, so such responses need no vary stub.
    pub(crate) declared_vary: Vec<HeaderName>,
    /// Freshness when the response states none.
    pub(crate) ttl: Option<Duration>,
    /// Freshness whatever the response states.
    pub(crate) override_ttl: Option<Duration>,
    pub(crate) grace: Option<Duration>,
    pub(crate) stale_if_error: Option<Duration>,
    /// Store responses with `Set-Cookie` (the header is removed first).
    pub(crate) strip_set_cookie: bool,
    /// Requests with `Authorization` are keyed by their credential.
    pub(crate) keyed_by_credential: bool,
    /// Requests with `Cookie` (or a credential header) are keyed by cookie,
    /// or the route's responses do not depend on cookies: such requests
    /// share responses like requests without them.
    pub(crate) cookies_shared: bool,
}

/// The `Cache-Control` that governs a shared cache: `CDN-Cache-Control`
/// when the response has one (RFC 9213 §2.1: the targeted field wins and the
/// general one is then ignored), else `Cache-Control`.
///
/// `Err` when either field does not parse. `CDN-Cache-Control` must be a
/// Structured Field Dictionary whose delta-seconds directives are integers
/// (RFC 9213 §2.1: `max-age=10000, &&&&&` and `max-age="10000"` are not).
/// RFC 9213 would fall back to `Cache-Control` past a `CDN-Cache-Control`
/// that does not parse, and would ignore a `Cache-Control` it overrides;
/// here a field that cannot be read may say `private` or `no-store`, so
/// doubt wins.
pub(crate) fn governing_cache_control(headers: &HeaderMap) -> Result<CacheControl, Unparseable> {
    let general = CacheControl::parse(headers.get_all(header::CACHE_CONTROL))?;
    let targeted = headers.get_all(&CDN_CACHE_CONTROL);
    if targeted.iter().next().is_some() {
        if !structured::is_cdn_cache_control(targeted.iter().map(http::HeaderValue::as_bytes)) {
            return Err(Unparseable);
        }
        return CacheControl::parse(targeted);
    }
    Ok(general)
}

/// `CDN-Cache-Control` (RFC 9213).
static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// Decides whether a response to a `GET` request with `facts` may be
/// stored, and its freshness. `Err` carries the reason for `Cache-Status`
/// `detail`.
pub(crate) fn storability(
    config: &PolicyConfig,
    overrides: &Overrides,
    status: StatusCode,
    headers: &HeaderMap,
    facts: &RequestFacts,
    now: SystemTime,
) -> Result<Freshness, &'static str> {
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err("status");
    }
    let Ok(cc) = governing_cache_control(headers) else {
        return Err("cache-control");
    };
    if cc.no_store {
        return Err("no-store");
    }
    if cc.private {
        return Err("private");
    }
    if headers.contains_key(header::SET_COOKIE) && !overrides.strip_set_cookie {
        return Err("set-cookie");
    }
    if vary_names(headers).is_none() {
        return Err("vary-star");
    }
    // RFC 9111 §3.5: a response to a request with Authorization is shared
    // only when it says so.
    let authorized_ok = cc.public || cc.s_maxage.is_some() || cc.must_revalidate;
    if facts.authorized && !authorized_ok && !overrides.keyed_by_credential {
        return Err("authorization");
    }
    // A response to a request with Cookie (or a credential header) may be
    // that user's page: shared only when it says so, `must-revalidate` not
    // counting (it says nothing of sharing; §3.5 lets it stand for
    // Authorization alone), or when the route keys by cookie or shares
    // cookies.
    let cookie_ok = cc.public || cc.s_maxage.is_some() || overrides.cookies_shared;
    if facts.cookie && !cookie_ok {
        return Err("cookie");
    }

    let now_ms = unix_ms(now);
    let lifetime_secs = match (overrides.override_ttl, explicit_lifetime(&cc, headers, now)) {
        (Some(ttl), _) => ttl.as_secs(),
        (None, Some(secs)) => secs,
        (None, None) if config.cacheable_statuses.contains(&status) => match overrides.ttl {
            Some(ttl) => ttl.as_secs(),
            None => {
                heuristic_lifetime(config, headers, now).unwrap_or(config.default_ttl.as_secs())
            }
        },
        (None, None) if cc.no_cache => 0,
        (None, None) => return Err("status"),
    };
    // RFC 9111 §4.2.3: the corrected initial age is the larger of the
    // apparent age (now minus `Date`) and the `Age` the response carries.
    let apparent_age_ms = headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::http_date::parse)
        .map(|date| now_ms.saturating_sub(unix_ms(date)))
        .unwrap_or(0);
    let age_ms = age_secs(headers).saturating_mul(1000).max(apparent_age_ms);
    let stored_at_ms = now_ms.saturating_sub(age_ms);
    let fresh_until_ms = stored_at_ms.saturating_add(lifetime_secs.saturating_mul(1000));
    let has_validator =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    // A response stale on arrival is worth keeping only to be validated
    // (no-cache, or a validator to revalidate with).
    if fresh_until_ms <= now_ms && !(cc.no_cache && has_validator) {
        return Err("stale");
    }
    // RFC 9111 §5.2.2.2, §5.2.2.8, §5.2.2.10: must-revalidate,
    // proxy-revalidate and s-maxage forbid serving the response stale.
    let no_stale = cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some();
    let window_ms = |stated: Option<u64>, configured: Duration| -> u64 {
        if no_stale || cc.no_cache {
            return 0;
        }
        match stated {
            // RFC 5861: the response's own window, when it states one.
            Some(secs) => secs.saturating_mul(1000),
            None => u64::try_from(configured.as_millis()).unwrap_or(u64::MAX),
        }
    };
    let mut entry_flags = 0;
    if cc.no_cache {
        entry_flags |= flags::REVALIDATE;
    }
    if no_stale {
        entry_flags |= flags::NO_STALE;
    }
    if authorized_ok {
        entry_flags |= flags::AUTHORIZED_OK;
    }
    if cookie_ok {
        entry_flags |= flags::COOKIE_OK;
    }
    Ok(Freshness {
        stored_at_ms,
        fresh_until_ms,
        stale_until_ms: fresh_until_ms.saturating_add(window_ms(
            cc.stale_while_revalidate,
            overrides.grace.unwrap_or(config.grace),
        )),
        error_until_ms: fresh_until_ms.saturating_add(window_ms(
            cc.stale_if_error,
            overrides.stale_if_error.unwrap_or(config.stale_if_error),
        )),
        flags: entry_flags,
    })
}

/// The freshness lifetime the response states (RFC 9111 §4.2.1): `s-maxage`
/// first (shared cache), then `max-age`, then `Expires` minus `Date`.
fn explicit_lifetime(cc: &CacheControl, headers: &HeaderMap, now: SystemTime) -> Option<u64> {
    if let Some(secs) = cc.s_maxage {
        return Some(secs);
    }
    if let Some(secs) = cc.max_age {
        return Some(secs);
    }
    let expires = headers.get(header::EXPIRES)?;
    // An invalid Expires ("0", a bad date) means already expired (§5.3).
    let Some(expires) = expires.to_str().ok().and_then(crate::http_date::parse) else {
        return Some(0);
    };
    let date = headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::http_date::parse)
        .unwrap_or(now);
    // Capped as a `max-age` is (RFC 9111 §1.2.2): a far-future `Expires`
    // is no longer-lived than the longest delta-seconds.
    Some(
        expires
            .duration_since(date)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .min(cache_control::MAX_DELTA_SECONDS),
    )
}

/// RFC 9111 §4.2.2: with heuristic freshness on, a response that states no
/// freshness but has a `Last-Modified` before its `Date` (or now) is fresh
/// for the configured fraction of that interval, capped. `None` when it is
/// off or the response has no usable `Last-Modified`.
fn heuristic_lifetime(config: &PolicyConfig, headers: &HeaderMap, now: SystemTime) -> Option<u64> {
    let (fraction, cap) = config.heuristic?;
    let modified = headers
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::http_date::parse)?;
    let date = headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::http_date::parse)
        .unwrap_or(now);
    let since = date.duration_since(modified).ok()?;
    Some(since.mul_f64(fraction).min(cap).as_secs())
}

/// The `Age` a response arrived with (RFC 9111 §5.1): the first member, an
/// invalid value ignored.
fn age_secs(headers: &HeaderMap) -> u64 {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| delta_seconds(v.trim()))
        .unwrap_or(0)
}

/// The request headers a response varies on; `None` for `Vary: *`.
pub(crate) fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(text) = value.to_str() else {
            return None;
        };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) if !names.contains(&name) => names.push(name),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
    Some(names)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones a cache recomputes; never
/// stored.
pub(crate) fn is_unstorable_header(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::AGE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The headers of a response as stored: without hop-by-hop headers, nor the
/// ones its `Connection` header names.
pub(crate) fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let connection_named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !is_unstorable_header(name) && !connection_named.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const NOW_MS: u64 = 1_700_000_000_000;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(NOW_MS)
    }

    fn config() -> PolicyConfig {
        PolicyConfig {
            default_ttl: Duration::from_secs(60),
            heuristic: None,
            grace: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            cacheable_statuses: DEFAULT_CACHEABLE_STATUSES.to_vec(),
            credential_headers: vec![HeaderName::from_static("x-api-key")],
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    /// A request without credentials.
    fn anonymous() -> RequestFacts {
        RequestFacts {
            may_store: true,
            ..RequestFacts::default()
        }
    }

    /// A request with `Authorization`.
    fn authorized() -> RequestFacts {
        RequestFacts {
            authorized: true,
            ..anonymous()
        }
    }

    /// A request with `Cookie` (or a credential header).
    fn with_cookie() -> RequestFacts {
        RequestFacts {
            cookie: true,
            ..anonymous()
        }
    }

    fn store(status: u16, pairs: &[(&str, &str)]) -> Result<Freshness, &'static str> {
        storability(
            &config(),
            &Overrides::default(),
            StatusCode::from_u16(status).unwrap(),
            &headers(pairs),
            &anonymous(),
            now(),
        )
    }

    #[test]
    fn s_maxage_wins_over_max_age() {
        let f = store(200, &[("cache-control", "max-age=10, s-maxage=20")]).unwrap();
        assert_eq!(f.fresh_until_ms, NOW_MS + 20_000);
    }

    #[test]
    fn default_ttl_applies_to_heuristic_statuses_only() {
        assert_eq!(store(200, &[]).unwrap().fresh_until_ms, NOW_MS + 60_000);
        assert_eq!(store(404, &[]).unwrap().fresh_until_ms, NOW_MS + 60_000);
        assert_eq!(store(500, &[]), Err("status"));
        assert_eq!(store(302, &[]), Err("status"));
        // Explicit freshness makes any final status storable (RFC 9111 §3).
        assert!(store(302, &[("cache-control", "max-age=5")]).is_ok());
    }

    #[test]
    fn heuristic_freshness_is_a_fraction_of_the_time_since_last_modified() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(NOW_MS);
        let modified = httpdate::fmt_http_date(now - Duration::from_secs(10_000));
        let cfg = PolicyConfig {
            heuristic: Some((0.1, Duration::from_secs(600))),
            ..config()
        };
        let lifetime = |headers: &HeaderMap| heuristic_lifetime(&cfg, headers, now);
        let mut headers = HeaderMap::new();
        assert_eq!(lifetime(&headers), None, "no Last-Modified");
        headers.insert(header::LAST_MODIFIED, modified.parse().unwrap());
        assert_eq!(
            lifetime(&headers),
            Some(600),
            "10 % of 10,000 s, capped at 600 s"
        );
        let cfg_small = PolicyConfig {
            heuristic: Some((0.01, Duration::from_secs(600))),
            ..config()
        };
        assert_eq!(heuristic_lifetime(&cfg_small, &headers, now), Some(100));
        // Off by default: the default TTL applies.
        assert_eq!(heuristic_lifetime(&config(), &headers, now), None);
        // A Last-Modified in the future says nothing.
        let future = httpdate::fmt_http_date(now + Duration::from_secs(60));
        headers.insert(header::LAST_MODIFIED, future.parse().unwrap());
        assert_eq!(lifetime(&headers), None);
    }

    #[test]
    fn zero_default_ttl_stores_only_explicit_freshness() {
        let cfg = PolicyConfig {
            default_ttl: Duration::ZERO,
            heuristic: None,
            ..config()
        };
        assert_eq!(
            storability(
                &cfg,
                &Overrides::default(),
                StatusCode::OK,
                &HeaderMap::new(),
                &anonymous(),
                now()
            ),
            Err("stale")
        );
        assert!(storability(
            &cfg,
            &Overrides::default(),
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=5")]),
            &anonymous(),
            now()
        )
        .is_ok());
    }

    #[test]
    fn never_stored() {
        assert_eq!(store(206, &[("cache-control", "max-age=5")]), Err("status"));
        assert_eq!(store(304, &[("cache-control", "max-age=5")]), Err("status"));
        assert_eq!(
            store(200, &[("cache-control", "no-store")]),
            Err("no-store")
        );
        assert_eq!(
            store(200, &[("cache-control", "private, max-age=60")]),
            Err("private")
        );
        assert_eq!(store(200, &[("set-cookie", "a=b")]), Err("set-cookie"));
        assert_eq!(store(200, &[("vary", "accept, *")]), Err("vary-star"));
        assert_eq!(store(200, &[("cache-control", "max-age=0")]), Err("stale"));
    }

    #[test]
    fn a_far_future_expires_is_capped_like_a_max_age() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        headers.insert(header::DATE, httpdate::fmt_http_date(now).parse().unwrap());
        headers.insert(
            header::EXPIRES,
            "Fri, 31 Dec 9999 23:59:59 GMT".parse().unwrap(),
        );
        let lifetime = explicit_lifetime(&CacheControl::default(), &headers, now);
        assert_eq!(lifetime, Some(cache_control::MAX_DELTA_SECONDS));
    }

    #[test]
    fn expires_counts_from_date() {
        let date = httpdate::fmt_http_date(now());
        let expires = httpdate::fmt_http_date(now() + Duration::from_secs(30));
        let f = store(200, &[("date", &date), ("expires", &expires)]).unwrap();
        assert_eq!(f.fresh_until_ms, NOW_MS + 30_000);
        assert_eq!(store(200, &[("expires", "0")]), Err("stale"));
    }

    #[test]
    fn apparent_age_from_date_counts() {
        // Date 100 s ago, 30 s of lifetime: already stale on arrival.
        let date = httpdate::fmt_http_date(now() - Duration::from_secs(100));
        let expires = httpdate::fmt_http_date(now() - Duration::from_secs(70));
        assert_eq!(
            store(200, &[("date", &date), ("expires", &expires)]),
            Err("stale")
        );
        let f = store(200, &[("date", &date), ("cache-control", "max-age=160")]).unwrap();
        assert_eq!(f.stored_at_ms, NOW_MS - 100_000);
        assert_eq!(f.fresh_until_ms, NOW_MS + 60_000);
    }

    #[test]
    fn age_shortens_freshness_and_bogus_age_is_ignored() {
        let f = store(200, &[("cache-control", "max-age=60"), ("age", "50")]).unwrap();
        assert_eq!(f.stored_at_ms, NOW_MS - 50_000);
        assert_eq!(f.fresh_until_ms, NOW_MS + 10_000);
        assert_eq!(
            store(200, &[("cache-control", "max-age=60"), ("age", "70")]),
            Err("stale")
        );
        let f = store(200, &[("cache-control", "max-age=60"), ("age", "abc")]).unwrap();
        assert_eq!(f.fresh_until_ms, NOW_MS + 60_000);
    }

    #[test]
    fn stale_windows_come_from_the_response_or_the_configuration() {
        let cfg = PolicyConfig {
            grace: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(300),
            ..config()
        };
        let f = storability(
            &cfg,
            &Overrides::default(),
            StatusCode::OK,
            &HeaderMap::new(),
            &anonymous(),
            now(),
        )
        .unwrap();
        assert_eq!(f.stale_until_ms, f.fresh_until_ms + 30_000);
        assert_eq!(f.error_until_ms, f.fresh_until_ms + 300_000);
        let stated = headers(&[(
            "cache-control",
            "max-age=10, stale-while-revalidate=5, stale-if-error=7",
        )]);
        let f = storability(
            &cfg,
            &Overrides::default(),
            StatusCode::OK,
            &stated,
            &anonymous(),
            now(),
        )
        .unwrap();
        assert_eq!(f.stale_until_ms, f.fresh_until_ms + 5_000);
        assert_eq!(f.error_until_ms, f.fresh_until_ms + 7_000);
    }

    #[test]
    fn must_revalidate_withholds_every_stale_window() {
        let cfg = PolicyConfig {
            grace: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(30),
            ..config()
        };
        for directive in [
            "must-revalidate",
            "proxy-revalidate, stale-while-revalidate=9",
        ] {
            let f = storability(
                &cfg,
                &Overrides::default(),
                StatusCode::OK,
                &headers(&[("cache-control", directive)]),
                &anonymous(),
                now(),
            )
            .unwrap();
            assert_eq!(f.stale_until_ms, f.fresh_until_ms);
            assert_eq!(f.error_until_ms, f.fresh_until_ms);
        }
    }

    #[test]
    fn requests_that_bypass() {
        let plan = |m: Method, pairs: &[(&str, &str)]| {
            plan_request(&m, &headers(pairs), ClientCacheControl::Obey, &config())
        };
        assert_eq!(plan(Method::POST, &[]), RequestPlan::Bypass("method"));
        assert!(matches!(
            plan(Method::GET, &[("range", "bytes=0-1")]),
            RequestPlan::Lookup(_)
        ));
        let RequestPlan::Lookup(facts) = plan(Method::GET, &[("authorization", "Bearer x")]) else {
            panic!()
        };
        assert!(facts.authorized);
        let RequestPlan::Lookup(facts) = plan(Method::HEAD, &[]) else {
            panic!()
        };
        assert!(facts.may_store && !facts.no_cache);
        let RequestPlan::Lookup(facts) = plan(Method::GET, &[("cache-control", "no-store")]) else {
            panic!()
        };
        assert!(!facts.may_store);
    }

    #[test]
    fn request_directives_obeyed_as_configured() {
        let facts = |client, pairs: &[(&str, &str)]| match plan_request(
            &Method::GET,
            &headers(pairs),
            client,
            &config(),
        ) {
            RequestPlan::Lookup(facts) => facts,
            RequestPlan::Bypass(d) => panic!("{d}"),
        };
        let busting = [(
            "cache-control",
            "no-cache, max-age=0, min-fresh=5, max-stale=9, only-if-cached",
        )];
        let obeyed = facts(ClientCacheControl::Obey, &busting);
        assert!(obeyed.no_cache && obeyed.only_if_cached);
        assert_eq!(
            (obeyed.max_age, obeyed.min_fresh, obeyed.max_stale),
            (Some(0), Some(5), Some(9))
        );
        let shielded = facts(ClientCacheControl::IgnoreRevalidation, &busting);
        assert!(!shielded.no_cache && shielded.only_if_cached);
        assert_eq!(
            (shielded.max_age, shielded.min_fresh, shielded.max_stale),
            (None, None, Some(9))
        );
        let ignored = facts(ClientCacheControl::Ignore, &busting);
        assert_eq!(
            ignored,
            RequestFacts {
                may_store: true,
                ..RequestFacts::default()
            }
        );
        // Pragma counts only without Cache-Control (RFC 9111 §5.4).
        assert!(facts(ClientCacheControl::Obey, &[("pragma", "no-cache")]).no_cache);
        assert!(
            !facts(
                ClientCacheControl::Obey,
                &[("pragma", "no-cache"), ("cache-control", "max-stale")]
            )
            .no_cache
        );
    }

    fn entry_with(fresh_for_secs: i64, entry_flags: u8) -> Entry {
        let fresh_until = (NOW_MS as i64 + fresh_for_secs * 1000) as u64;
        Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: bytes::Bytes::new(),
            trailers: None,
            stored_at_ms: NOW_MS - 10_000,
            fresh_until_ms: fresh_until,
            stale_until_ms: fresh_until,
            error_until_ms: fresh_until,
            rebuild_ms: 0,
            flags: entry_flags,
            vary: Vec::new(),
        }
    }

    #[test]
    fn usability_follows_request_and_entry_directives() {
        let any = RequestFacts {
            may_store: true,
            ..RequestFacts::default()
        };
        assert_eq!(
            usability(&entry_with(5, 0), &any, false, NOW_MS),
            Usability::Fresh
        );
        assert_eq!(
            usability(&entry_with(-1, 0), &any, false, NOW_MS),
            Usability::Validate
        );
        assert_eq!(
            usability(&entry_with(5, flags::REVALIDATE), &any, false, NOW_MS),
            Usability::Validate
        );
        let no_cache = RequestFacts {
            no_cache: true,
            ..any.clone()
        };
        assert_eq!(
            usability(&entry_with(5, 0), &no_cache, false, NOW_MS),
            Usability::Validate
        );
        // Age is 10 s.
        let max_age = RequestFacts {
            max_age: Some(5),
            ..any.clone()
        };
        assert_eq!(
            usability(&entry_with(5, 0), &max_age, false, NOW_MS),
            Usability::Validate
        );
        let min_fresh = RequestFacts {
            min_fresh: Some(10),
            ..any.clone()
        };
        assert_eq!(
            usability(&entry_with(5, 0), &min_fresh, false, NOW_MS),
            Usability::Validate
        );
        let max_stale = RequestFacts {
            max_stale: Some(3),
            ..any.clone()
        };
        assert_eq!(
            usability(&entry_with(-2, 0), &max_stale, false, NOW_MS),
            Usability::StaleAccepted
        );
        assert_eq!(
            usability(&entry_with(-4, 0), &max_stale, false, NOW_MS),
            Usability::Validate
        );
        assert_eq!(
            usability(&entry_with(-2, flags::NO_STALE), &max_stale, false, NOW_MS),
            Usability::Validate
        );
        let authorized = RequestFacts {
            authorized: true,
            ..any.clone()
        };
        assert_eq!(
            usability(&entry_with(5, 0), &authorized, false, NOW_MS),
            Usability::NotShared
        );
        assert_eq!(
            usability(&entry_with(5, 0), &authorized, true, NOW_MS),
            Usability::Fresh
        );
        assert_eq!(
            usability(
                &entry_with(5, flags::AUTHORIZED_OK),
                &authorized,
                false,
                NOW_MS
            ),
            Usability::Fresh
        );
    }

    #[test]
    fn cdn_cache_control_wins_and_no_cache_is_stored_for_validation() {
        let f = store(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=30"),
            ],
        )
        .unwrap();
        assert_eq!(f.fresh_until_ms, NOW_MS + 30_000);
        assert_eq!(
            store(
                200,
                &[
                    ("cache-control", "max-age=30"),
                    ("cdn-cache-control", "no-store")
                ]
            ),
            Err("no-store")
        );
        let f = store(200, &[("cache-control", "no-cache, max-age=60")]).unwrap();
        assert!(f.flags & flags::REVALIDATE != 0);
        let f = store(200, &[("cache-control", "s-maxage=60")]).unwrap();
        assert!(f.flags & flags::NO_STALE != 0 && f.flags & flags::AUTHORIZED_OK != 0);
    }

    #[test]
    fn authorized_responses_need_explicit_permission() {
        let store_authorized = |pairs: &[(&str, &str)]| {
            storability(
                &config(),
                &Overrides::default(),
                StatusCode::OK,
                &headers(pairs),
                &authorized(),
                now(),
            )
        };
        assert_eq!(
            store_authorized(&[("cache-control", "max-age=60")]),
            Err("authorization")
        );
        assert!(store_authorized(&[("cache-control", "public, max-age=60")]).is_ok());
        assert!(store_authorized(&[("cache-control", "s-maxage=60")]).is_ok());
        assert!(store_authorized(&[("cache-control", "must-revalidate, max-age=60")]).is_ok());
        let keyed = Overrides {
            keyed_by_credential: true,
            ..Overrides::default()
        };
        assert!(storability(
            &config(),
            &keyed,
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=60")]),
            &authorized(),
            now()
        )
        .is_ok());
    }

    #[test]
    fn cookie_responses_are_stored_only_when_shareable() {
        let store_with = |facts: &RequestFacts, overrides: &Overrides, pairs: &[(&str, &str)]| {
            storability(
                &config(),
                overrides,
                StatusCode::OK,
                &headers(pairs),
                facts,
                now(),
            )
        };
        let plain = Overrides::default();
        // A personal page: neither a default TTL nor max-age makes it shared.
        assert_eq!(store_with(&with_cookie(), &plain, &[]), Err("cookie"));
        assert_eq!(
            store_with(&with_cookie(), &plain, &[("cache-control", "max-age=60")]),
            Err("cookie")
        );
        // must-revalidate lets Authorization through (RFC 9111 §3.5), not
        // cookies.
        assert_eq!(
            store_with(
                &with_cookie(),
                &plain,
                &[("cache-control", "must-revalidate, max-age=60")]
            ),
            Err("cookie")
        );
        for shareable in ["public, max-age=60", "s-maxage=60"] {
            let f = store_with(&with_cookie(), &plain, &[("cache-control", shareable)]).unwrap();
            assert!(f.flags & flags::COOKIE_OK != 0, "{shareable}");
        }
        // A route that keys by cookie or shares cookies stores it, and
        // marks every entry it stores as fit for cookie requests.
        let shared = Overrides {
            cookies_shared: true,
            ..Overrides::default()
        };
        for facts in [with_cookie(), anonymous()] {
            let f = store_with(&facts, &shared, &[]).unwrap();
            assert!(f.flags & flags::COOKIE_OK != 0);
        }
        // An anonymous response that does not say it is shareable is
        // stored, but not for cookie requests.
        let f = store_with(&anonymous(), &plain, &[("cache-control", "max-age=60")]).unwrap();
        assert_eq!(f.flags & flags::COOKIE_OK, 0);
        // Keying by the Authorization credential does not share cookies.
        let keyed = Overrides {
            keyed_by_credential: true,
            ..Overrides::default()
        };
        let both = RequestFacts {
            cookie: true,
            ..authorized()
        };
        assert_eq!(store_with(&both, &keyed, &[]), Err("cookie"));
        assert_eq!(store_with(&both, &shared, &[]), Err("authorization"));
    }

    #[test]
    fn cookies_and_credential_headers_make_a_request_personal() {
        let facts = |client, pairs: &[(&str, &str)]| match plan_request(
            &Method::GET,
            &headers(pairs),
            client,
            &config(),
        ) {
            RequestPlan::Lookup(facts) => facts,
            RequestPlan::Bypass(d) => panic!("{d}"),
        };
        let obey = ClientCacheControl::Obey;
        assert!(facts(obey, &[("cookie", "session=a")]).cookie);
        // `x-api-key` is the test configuration's credential header.
        assert!(facts(obey, &[("x-api-key", "k")]).cookie);
        assert!(facts(ClientCacheControl::Ignore, &[("cookie", "session=a")]).cookie);
        let anonymous = facts(obey, &[("x-other", "1"), ("set-cookie", "a=b")]);
        assert!(!anonymous.cookie && !anonymous.authorized);

        let plain = Overrides::default();
        let keyed = Overrides {
            keyed_by_credential: true,
            ..Overrides::default()
        };
        let shared = Overrides {
            cookies_shared: true,
            ..Overrides::default()
        };
        assert!(!anonymous.personal(&plain));
        assert!(with_cookie().personal(&plain));
        assert!(with_cookie().personal(&keyed));
        assert!(!with_cookie().personal(&shared));
        assert!(authorized().personal(&plain));
        assert!(authorized().personal(&shared));
        assert!(!authorized().personal(&keyed));
        let both = RequestFacts {
            cookie: true,
            ..authorized()
        };
        assert!(both.personal(&keyed) && both.personal(&shared));
        let both_shared = Overrides {
            keyed_by_credential: true,
            cookies_shared: true,
            ..Overrides::default()
        };
        assert!(!both.personal(&both_shared));
    }

    #[test]
    fn cookie_requests_are_served_only_entries_fit_for_them() {
        let cookie = with_cookie();
        assert_eq!(
            usability(&entry_with(5, 0), &cookie, false, NOW_MS),
            Usability::NotShared
        );
        // Fit for Authorization (must-revalidate) is not fit for cookies,
        // and keying Authorization does not change that.
        assert_eq!(
            usability(&entry_with(5, flags::AUTHORIZED_OK), &cookie, true, NOW_MS),
            Usability::NotShared
        );
        assert_eq!(
            usability(&entry_with(5, flags::COOKIE_OK), &cookie, false, NOW_MS),
            Usability::Fresh
        );
        assert_eq!(
            usability(&entry_with(-1, flags::COOKIE_OK), &cookie, false, NOW_MS),
            Usability::Validate
        );
        // Both credentials: the entry must be fit for both.
        let both = RequestFacts {
            cookie: true,
            ..authorized()
        };
        assert_eq!(
            usability(&entry_with(5, flags::COOKIE_OK), &both, false, NOW_MS),
            Usability::NotShared
        );
        assert_eq!(
            usability(
                &entry_with(5, flags::COOKIE_OK | flags::AUTHORIZED_OK),
                &both,
                false,
                NOW_MS
            ),
            Usability::Fresh
        );
        assert!(may_answer(&entry_with(5, 0), &anonymous(), false));
    }

    fn raw_headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn unparseable_response_cache_control_is_not_stored() {
        let store_raw = |pairs: &[(&str, &[u8])]| {
            storability(
                &config(),
                &Overrides::default(),
                StatusCode::OK,
                &raw_headers(pairs),
                &anonymous(),
                now(),
            )
        };
        // `private` next to a byte that is not visible ASCII is not lost.
        assert_eq!(
            store_raw(&[("cache-control", "private, x=\"é\"".as_bytes())]),
            Err("cache-control")
        );
        for bad in ["max-age=60, x=\"open", "max-age=60; private", "max age=60"] {
            assert_eq!(
                store(200, &[("cache-control", bad)]),
                Err("cache-control"),
                "{bad}"
            );
            // Either field spoils it: a targeted field does not hide a
            // general one that cannot be read, nor the other way round.
            assert_eq!(
                store(
                    200,
                    &[("cache-control", bad), ("cdn-cache-control", "max-age=60")]
                ),
                Err("cache-control"),
                "{bad}"
            );
            assert_eq!(
                store(
                    200,
                    &[("cache-control", "max-age=60"), ("cdn-cache-control", bad)]
                ),
                Err("cache-control"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_cdn_cache_control_that_is_no_structured_dictionary_stores_nothing() {
        for bad in [
            "max-age=10000, &&&&&",
            "max-age=\"10000\"",
            "max-age=60;",
            "Max-Age=60",
        ] {
            assert_eq!(
                store(
                    200,
                    &[("cache-control", "max-age=60"), ("cdn-cache-control", bad)]
                ),
                Err("cache-control"),
                "{bad}"
            );
        }
        let f = store(
            200,
            &[("cdn-cache-control", "max-age=30, stale-if-error=10")],
        )
        .unwrap();
        assert_eq!(f.fresh_until_ms - f.stored_at_ms, 30_000);
    }

    #[test]
    fn valid_cache_control_syntax_stays_storable() {
        for good in [
            "max-age=60",
            "public, max-age=60, community=\"UCI\"",
            "no-cache=\"set-cookie, x-a\", max-age=60",
            " ,max-age=60 ,\t, x-ext",
            "max-age=\"60\"",
        ] {
            let f =
                store(200, &[("cache-control", good)]).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(f.fresh_until_ms, NOW_MS + 60_000, "{good}");
        }
    }

    #[test]
    fn unparseable_request_cache_control_bypasses() {
        let plan = |client, pairs: &[(&str, &[u8])]| {
            plan_request(&Method::GET, &raw_headers(pairs), client, &config())
        };
        for client in [
            ClientCacheControl::Obey,
            ClientCacheControl::IgnoreRevalidation,
        ] {
            assert_eq!(
                plan(client, &[("cache-control", b"no-store, x=\"")]),
                RequestPlan::Bypass("cache-control")
            );
            assert_eq!(
                plan(client, &[("cache-control", "no-store, x=\"é\"".as_bytes())]),
                RequestPlan::Bypass("cache-control")
            );
            assert!(matches!(
                plan(client, &[("cache-control", b"max-stale, x=\"a, b\"")]),
                RequestPlan::Lookup(_)
            ));
        }
        // Told to ignore every request directive, the layer reads none.
        assert!(matches!(
            plan(
                ClientCacheControl::Ignore,
                &[("cache-control", b"no-store, x=\"")]
            ),
            RequestPlan::Lookup(_)
        ));
    }

    #[test]
    fn route_overrides() {
        let o = Overrides {
            override_ttl: Some(Duration::from_secs(5)),
            ..Overrides::default()
        };
        let f = storability(
            &config(),
            &o,
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=600")]),
            &anonymous(),
            now(),
        )
        .unwrap();
        assert_eq!(f.fresh_until_ms, NOW_MS + 5_000);
        let o = Overrides {
            ttl: Some(Duration::from_secs(7)),
            ..Overrides::default()
        };
        let f = storability(
            &config(),
            &o,
            StatusCode::OK,
            &HeaderMap::new(),
            &anonymous(),
            now(),
        )
        .unwrap();
        assert_eq!(f.fresh_until_ms, NOW_MS + 7_000);
        let o = Overrides {
            strip_set_cookie: true,
            ..Overrides::default()
        };
        assert!(storability(
            &config(),
            &o,
            StatusCode::OK,
            &headers(&[("set-cookie", "a=b")]),
            &anonymous(),
            now()
        )
        .is_ok());
    }

    #[test]
    fn hop_by_hop_headers_are_not_stored() {
        let stored = storable_headers(&headers(&[
            ("connection", "x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("age", "3"),
            ("content-type", "text/plain"),
        ]));
        assert_eq!(stored.len(), 1);
        assert!(stored.contains_key("content-type"));
    }

    #[test]
    fn vary_names_are_collected() {
        assert_eq!(
            vary_names(&headers(&[
                ("vary", "Accept-Encoding, accept-language"),
                ("vary", "accept-encoding")
            ])),
            Some(vec![
                HeaderName::from_static("accept-encoding"),
                HeaderName::from_static("accept-language")
            ])
        );
        assert_eq!(vary_names(&headers(&[("vary", "*")])), None);
    }
}
