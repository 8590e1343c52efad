//! Validators: answering a client's conditional request from an entry
//! (RFC 9110 §13), and revalidating a stored entry with the origin
//! (RFC 9111 §4.3).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::entry::Entry;

/// Whether a `GET`/`HEAD` with `request` headers may be answered `304 Not
/// Modified` from `entry` (RFC 9110 §13.1.2, §13.1.3, §13.2.2): a matching
/// `If-None-Match` (weak comparison), or — without `If-None-Match` — an
/// `If-Modified-Since` no earlier than the entry's `Last-Modified`.
pub(crate) fn not_modified(entry: &Entry, request: &HeaderMap) -> bool {
    if !entry.status.is_success() {
        return false;
    }
    let mut if_none_match = request.get_all(header::IF_NONE_MATCH).iter().peekable();
    if if_none_match.peek().is_some() {
        let Some(etag) = entry
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
        else {
            // `*` matches any current representation.
            return if_none_match
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.trim() == "*");
        };
        return if_none_match
            .filter_map(|v| v.to_str().ok())
            .flat_map(split_etags)
            .any(|candidate| candidate == "*" || weak_eq(candidate, etag));
    }
    let Some(since) = request
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::http_date::parse)
    else {
        return false;
    };
    let Some(modified) = entry
        .headers
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::http_date::parse)
    else {
        return false;
    };
    modified <= since
}

/// Splits an `If-None-Match` list, keeping quoted commas inside tags.
fn split_etags(value: &str) -> impl Iterator<Item = &str> {
    let mut tags = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, b) in value.bytes().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                tags.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    tags.push(value[start..].trim());
    tags.into_iter().filter(|t| !t.is_empty())
}

/// Weak comparison (RFC 9110 §8.8.3.2): equal opaque tags, `W/` ignored.
fn weak_eq(a: &str, b: &str) -> bool {
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    opaque(a) == opaque(b)
}

/// The headers a `304` carries: those a `200` would have among
/// `Cache-Control`, `Content-Location`, `Date`, `ETag`, `Expires`, `Vary`
/// (RFC 9110 §15.4.5), and `Last-Modified`.
pub(crate) fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
    ] {
        for value in stored.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The validators to revalidate `entry` with: `If-None-Match` from its
/// `ETag`, `If-Modified-Since` from its `Last-Modified` (RFC 9111 §4.3.1).
pub(crate) fn conditional_headers(entry: &Entry) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    if let Some(etag) = entry.headers.get(header::ETAG) {
        out.push((header::IF_NONE_MATCH, etag.clone()));
    }
    if let Some(modified) = entry.headers.get(header::LAST_MODIFIED) {
        out.push((header::IF_MODIFIED_SINCE, modified.clone()));
    }
    out
}

/// The stored headers updated by a `304` (RFC 9111 §4.3.4): each header
/// field the `304` carries replaces the stored one of that name, except the
/// ones that describe the body the `304` does not have.
pub(crate) fn merge_not_modified(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut merged = stored.clone();
    let mut replaced: Vec<&HeaderName> = Vec::new();
    for (name, value) in not_modified {
        if *name == header::CONTENT_LENGTH
            || *name == header::CONTENT_ENCODING
            || *name == header::TRANSFER_ENCODING
            || *name == header::CONTENT_RANGE
        {
            continue;
        }
        if !replaced.contains(&name) {
            merged.remove(name);
            replaced.push(name);
        }
        merged.append(name.clone(), value.clone());
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::StatusCode;

    fn entry(pairs: &[(&str, &str)]) -> Entry {
        let mut headers = HeaderMap::new();
        for (n, v) in pairs {
            headers.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Entry {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"x"),
            trailers: None,
            stored_at_ms: 0,
            fresh_until_ms: 1,
            stale_until_ms: 1,
            error_until_ms: 1,
            rebuild_ms: 0,
            flags: 0,
            vary: Vec::new(),
        }
    }

    fn request(pairs: &[(&str, &str)]) -> HeaderMap {
        entry(pairs).headers
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let e = entry(&[("etag", "W/\"v1\"")]);
        assert!(not_modified(&e, &request(&[("if-none-match", "\"v1\"")])));
        assert!(not_modified(
            &e,
            &request(&[("if-none-match", "\"x\", W/\"v1\"")])
        ));
        assert!(not_modified(&e, &request(&[("if-none-match", "*")])));
        assert!(!not_modified(&e, &request(&[("if-none-match", "\"v2\"")])));
    }

    #[test]
    fn if_modified_since_only_without_if_none_match() {
        let e = entry(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 01 Jan 2030 00:00:00 GMT"),
        ]);
        let later = "Wed, 02 Jan 2030 00:00:00 GMT";
        let earlier = "Mon, 31 Dec 2029 00:00:00 GMT";
        assert!(not_modified(&e, &request(&[("if-modified-since", later)])));
        assert!(!not_modified(
            &e,
            &request(&[("if-modified-since", earlier)])
        ));
        // If-None-Match decides when both are present.
        assert!(!not_modified(
            &e,
            &request(&[("if-none-match", "\"v2\""), ("if-modified-since", later)])
        ));
        assert!(!not_modified(
            &e,
            &request(&[("if-modified-since", "garbage")])
        ));
    }

    #[test]
    fn errors_are_never_not_modified() {
        let mut e = entry(&[("etag", "\"v1\"")]);
        e.status = StatusCode::NOT_FOUND;
        assert!(!not_modified(&e, &request(&[("if-none-match", "\"v1\"")])));
    }

    #[test]
    fn a_304_updates_stored_headers_but_not_the_body_ones() {
        let stored = request(&[
            ("cache-control", "max-age=1"),
            ("content-length", "5"),
            ("x-a", "old"),
            ("x-keep", "k"),
        ]);
        let fresh = request(&[
            ("cache-control", "max-age=60"),
            ("content-length", "0"),
            ("x-a", "new1"),
            ("x-a", "new2"),
        ]);
        let merged = merge_not_modified(&stored, &fresh);
        assert_eq!(merged["cache-control"], "max-age=60");
        assert_eq!(merged["content-length"], "5");
        assert_eq!(
            merged.get_all("x-a").iter().collect::<Vec<_>>(),
            ["new1", "new2"]
        );
        assert_eq!(merged["x-keep"], "k");
    }

    #[test]
    fn revalidation_sends_the_entry_validators() {
        let e = entry(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 01 Jan 2030 00:00:00 GMT"),
        ]);
        let names: Vec<_> = conditional_headers(&e)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE]);
    }
}
