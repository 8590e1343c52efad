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

use cache_control::delta_seconds;
pub(crate) use cache_control::CacheControl;

use crate::entry::unix_ms;

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
    /// Stale-while-revalidate window when the response states none.
    pub(crate) grace: Duration,
    /// Stale-if-error window when the response states none.
    pub(crate) stale_if_error: Duration,
    pub(crate) cacheable_statuses: Vec<StatusCode>,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestPlan {
    /// Look the request up; store the response if `may_store`.
    Lookup { may_store: bool },
    /// Send the request to the inner service without consulting the cache;
    /// the reason goes to `Cache-Status` `detail`.
    Bypass(&'static str),
}

/// Decides whether a request may be answered from the cache.
pub(crate) fn plan_request(method: &Method, headers: &HeaderMap) -> RequestPlan {
    if method != Method::GET && method != Method::HEAD {
        return RequestPlan::Bypass("method");
    }
    // RFC 9111 §3.5: a shared cache must not reuse a response to a request
    // with Authorization unless the response allows it explicitly; until
    // that is checked per response, such requests bypass the cache.
    if headers.contains_key(header::AUTHORIZATION) {
        return RequestPlan::Bypass("authorization");
    }
    // A stored full response is not sliced into ranges; `206` is not stored.
    if headers.contains_key(header::RANGE) {
        return RequestPlan::Bypass("range");
    }
    // A protocol switch (WebSocket) is not a cacheable exchange.
    if headers.contains_key(header::UPGRADE) {
        return RequestPlan::Bypass("upgrade");
    }
    let cc = CacheControl::parse(headers.get_all(header::CACHE_CONTROL));
    // RFC 9111 §5.2.1.5: no-store in a request forbids storing the response.
    RequestPlan::Lookup {
        may_store: !cc.no_store,
    }
}

/// The times that make a response an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Freshness {
    /// When the response was generated: now minus its `Age` (ms since epoch).
    pub(crate) stored_at_ms: u64,
    pub(crate) fresh_until_ms: u64,
    pub(crate) stale_until_ms: u64,
    pub(crate) error_until_ms: u64,
}

/// Decides whether a response to a `GET` may be stored, and its freshness.
/// `Err` carries the reason for `Cache-Status` `detail`.
pub(crate) fn storability(
    config: &PolicyConfig,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<Freshness, &'static str> {
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err("status");
    }
    let cc = CacheControl::parse(headers.get_all(header::CACHE_CONTROL));
    if cc.no_store {
        return Err("no-store");
    }
    if cc.private {
        return Err("private");
    }
    // Storing and revalidating every use needs conditional requests to the
    // origin; until then, a response that may not be reused unvalidated is
    // not stored.
    if cc.no_cache {
        return Err("no-cache");
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err("set-cookie");
    }
    if vary_names(headers).is_none() {
        return Err("vary-star");
    }

    let now_ms = unix_ms(now);
    let lifetime_secs = match explicit_lifetime(&cc, headers, now) {
        Some(secs) => secs,
        None if config.cacheable_statuses.contains(&status) => config.default_ttl.as_secs(),
        None => return Err("status"),
    };
    // RFC 9111 §4.2.3: the corrected initial age is the larger of the
    // apparent age (now minus `Date`) and the `Age` the response carries.
    let apparent_age_ms = headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .map(|date| now_ms.saturating_sub(unix_ms(date)))
        .unwrap_or(0);
    let age_ms = age_secs(headers).saturating_mul(1000).max(apparent_age_ms);
    let stored_at_ms = now_ms.saturating_sub(age_ms);
    let fresh_until_ms = stored_at_ms.saturating_add(lifetime_secs.saturating_mul(1000));
    if fresh_until_ms <= now_ms {
        return Err("stale");
    }
    // RFC 9111 §5.2.2.2, §5.2.2.8: must-revalidate and proxy-revalidate
    // forbid serving the response stale, whatever else says so.
    let may_serve_stale = !(cc.must_revalidate || cc.proxy_revalidate);
    let window_ms = |stated: Option<u64>, configured: Duration| -> u64 {
        if !may_serve_stale {
            return 0;
        }
        match stated {
            // RFC 5861: the response's own window, when it states one.
            Some(secs) => secs.saturating_mul(1000),
            None => u64::try_from(configured.as_millis()).unwrap_or(u64::MAX),
        }
    };
    Ok(Freshness {
        stored_at_ms,
        fresh_until_ms,
        stale_until_ms: fresh_until_ms
            .saturating_add(window_ms(cc.stale_while_revalidate, config.grace)),
        error_until_ms: fresh_until_ms
            .saturating_add(window_ms(cc.stale_if_error, config.stale_if_error)),
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
    let Some(expires) = expires
        .to_str()
        .ok()
        .and_then(|v| httpdate::parse_http_date(v).ok())
    else {
        return Some(0);
    };
    let date = headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or(now);
    Some(
        expires
            .duration_since(date)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
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
            grace: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            cacheable_statuses: DEFAULT_CACHEABLE_STATUSES.to_vec(),
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

    fn store(status: u16, pairs: &[(&str, &str)]) -> Result<Freshness, &'static str> {
        storability(
            &config(),
            StatusCode::from_u16(status).unwrap(),
            &headers(pairs),
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
    fn zero_default_ttl_stores_only_explicit_freshness() {
        let cfg = PolicyConfig {
            default_ttl: Duration::ZERO,
            ..config()
        };
        assert_eq!(
            storability(&cfg, StatusCode::OK, &HeaderMap::new(), now()),
            Err("stale")
        );
        assert!(storability(
            &cfg,
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=5")]),
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
        assert_eq!(
            store(200, &[("cache-control", "no-cache")]),
            Err("no-cache")
        );
        assert_eq!(store(200, &[("set-cookie", "a=b")]), Err("set-cookie"));
        assert_eq!(store(200, &[("vary", "accept, *")]), Err("vary-star"));
        assert_eq!(store(200, &[("cache-control", "max-age=0")]), Err("stale"));
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
        let f = storability(&cfg, StatusCode::OK, &HeaderMap::new(), now()).unwrap();
        assert_eq!(f.stale_until_ms, f.fresh_until_ms + 30_000);
        assert_eq!(f.error_until_ms, f.fresh_until_ms + 300_000);
        let stated = headers(&[(
            "cache-control",
            "max-age=10, stale-while-revalidate=5, stale-if-error=7",
        )]);
        let f = storability(&cfg, StatusCode::OK, &stated, now()).unwrap();
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
                StatusCode::OK,
                &headers(&[("cache-control", directive)]),
                now(),
            )
            .unwrap();
            assert_eq!(f.stale_until_ms, f.fresh_until_ms);
            assert_eq!(f.error_until_ms, f.fresh_until_ms);
        }
    }

    #[test]
    fn requests_that_bypass() {
        let plan = |m: Method, pairs: &[(&str, &str)]| plan_request(&m, &headers(pairs));
        assert_eq!(plan(Method::POST, &[]), RequestPlan::Bypass("method"));
        assert_eq!(
            plan(Method::GET, &[("authorization", "Bearer x")]),
            RequestPlan::Bypass("authorization")
        );
        assert_eq!(
            plan(Method::GET, &[("range", "bytes=0-1")]),
            RequestPlan::Bypass("range")
        );
        assert_eq!(
            plan(Method::HEAD, &[]),
            RequestPlan::Lookup { may_store: true }
        );
        assert_eq!(
            plan(Method::GET, &[("cache-control", "no-store")]),
            RequestPlan::Lookup { may_store: false }
        );
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
