//! Answering a `Range` request from a stored full `200` (RFC 9110 §14):
//! `206 Partial Content` with one range or several (`multipart/byteranges`,
//! §14.6), `416 Range Not Satisfiable`, or, when the ranges are ignored,
//! the full response.
//!
//! The `Range` field is parsed by `http-range-header`. A request's ranges
//! are ignored (the full `200` is served, as §14.2 allows) when:
//!
//! - the method is not `GET` (§14.2: range handling is defined for `GET`
//!   only), or the request has no `Range` or more than one `Range` line;
//! - the `Range` is not `bytes=…` or does not parse;
//! - it holds more than [`MAX_RANGES`] ranges, more than two that overlap,
//!   or ranges whose lengths add up to more than the body (§14.2 names
//!   these as signs of a broken or hostile client);
//! - `If-Range` does not hold (§13.1.5, see [`if_range_holds`]);
//! - the stored response is not a `200`, carries trailers, or its origin
//!   said `Accept-Ranges: none`.
//!
//! Ranges apply to the stored bytes: for an entry with `Content-Encoding`
//! they are ranges of the encoded content (§14.1.2).

use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use http_range_header::RangeUnsatisfiableError;

use crate::entry::Entry;

/// Most ranges one request may ask for; with more, the ranges are ignored
/// and the full response is served.
pub(crate) const MAX_RANGES: usize = 16;

/// How a stored response answers a request's `Range`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selected {
    /// No usable `Range`: the full response.
    Full,
    /// These ranges of the body, in the order asked (one or more).
    Ranges(Vec<RangeInclusive<u64>>),
    /// No range overlaps the body: `416`.
    Unsatisfiable,
}

/// Whether the request asks for ranges at all (a `Range` field), whatever
/// they turn out to select.
pub(crate) fn asks_range(request: &HeaderMap) -> bool {
    request.contains_key(header::RANGE)
}

/// What `entry` answers to a `GET` with `request` headers.
pub(crate) fn select(entry: &Entry, request: &HeaderMap) -> Selected {
    // Most requests ask for no range: one lookup, and done.
    let mut lines = request.get_all(header::RANGE).iter();
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Selected::Full;
    };
    if entry.status != StatusCode::OK || entry.trailers.is_some() || refuses_ranges(entry) {
        return Selected::Full;
    }
    let Ok(text) = line.to_str() else {
        return Selected::Full;
    };
    if !if_range_holds(entry, request) {
        return Selected::Full;
    }
    let Some(max) = NonZeroUsize::new(MAX_RANGES) else {
        return Selected::Full;
    };
    let Ok(parsed) = http_range_header::parse_range_header_with_max_ranges(text, max) else {
        return Selected::Full;
    };
    let len = entry.body.len() as u64;
    match parsed.validate(len) {
        Ok(ranges) if ranges.is_empty() => Selected::Full,
        Ok(ranges) => {
            let asked: u64 = ranges
                .iter()
                .map(|r| r.end().saturating_sub(*r.start()).saturating_add(1))
                .fold(0, u64::saturating_add);
            if asked > len {
                Selected::Full
            } else {
                Selected::Ranges(ranges)
            }
        }
        Err(RangeUnsatisfiableError::Unsatisfiable) => Selected::Unsatisfiable,
        Err(_) => Selected::Full,
    }
}

fn refuses_ranges(entry: &Entry) -> bool {
    entry
        .headers
        .get_all(header::ACCEPT_RANGES)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.trim().eq_ignore_ascii_case("none"))
}

/// Whether the request's `If-Range` (if any) allows its ranges to be served
/// from `entry` (RFC 9110 §13.1.5): an entity tag must equal the entry's
/// `ETag` by strong comparison (a weak tag on either side never matches);
/// a date must equal the entry's `Last-Modified` exactly, and that date
/// must be a strong validator: the entry's `Date` at least one second after
/// it (§8.8.2.2). Anything else (several `If-Range` lines, a value that does
/// not parse) does not hold, and the full response is served.
pub(crate) fn if_range_holds(entry: &Entry, request: &HeaderMap) -> bool {
    let mut lines = request.get_all(header::IF_RANGE).iter();
    let line = match (lines.next(), lines.next()) {
        (None, _) => return true,
        (Some(line), None) => line,
        (Some(_), Some(_)) => return false,
    };
    let Ok(value) = line.to_str() else {
        return false;
    };
    let value = value.trim();
    if value.starts_with("W/") {
        return false;
    }
    if value.starts_with('"') {
        let stored = entry
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        return is_entity_tag(value) && stored == Some(value);
    }
    let date = |name| {
        entry
            .headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .and_then(crate::http_date::parse)
    };
    let (Some(asked), Some(modified), Some(generated)) = (
        crate::http_date::parse(value),
        date(header::LAST_MODIFIED),
        date(header::DATE),
    ) else {
        return false;
    };
    let strong = generated
        .duration_since(modified)
        .is_ok_and(|gap| gap >= Duration::from_secs(1));
    strong && asked == modified
}

/// A strong entity tag: `"…"` with no `"` inside.
fn is_entity_tag(value: &str) -> bool {
    value.len() >= 2 && value.ends_with('"') && !value[1..value.len() - 1].contains('"')
}

/// A response cut from a stored one: its status, the headers to set over
/// (or instead of) the stored ones, and its body.
#[derive(Debug)]
pub(crate) struct Partial {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// The `206` (or `416`) of `selected` (not [`Selected::Full`]) from a
/// stored response with `headers` and `body`; `None` when it cannot be made
/// (no boundary that the parts do not hold was found): serve the full
/// response then.
pub(crate) fn partial(selected: &Selected, headers: &HeaderMap, body: &Bytes) -> Option<Partial> {
    let len = body.len() as u64;
    match selected {
        Selected::Full => None,
        Selected::Unsatisfiable => {
            let mut out = HeaderMap::new();
            out.insert(header::CONTENT_RANGE, content_range_unsatisfied(len));
            out.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
            Some(Partial {
                status: StatusCode::RANGE_NOT_SATISFIABLE,
                headers: out,
                body: Bytes::new(),
            })
        }
        Selected::Ranges(ranges) => match ranges.as_slice() {
            [one] => {
                let part = slice(body, one)?;
                let mut out = headers.clone();
                out.insert(header::CONTENT_RANGE, content_range(one, len));
                out.insert(header::CONTENT_LENGTH, HeaderValue::from(part.len()));
                Some(Partial {
                    status: StatusCode::PARTIAL_CONTENT,
                    headers: out,
                    body: part,
                })
            }
            many => multipart(many, headers, body),
        },
    }
}

fn slice(body: &Bytes, range: &RangeInclusive<u64>) -> Option<Bytes> {
    let start = usize::try_from(*range.start()).ok()?;
    let end = usize::try_from(*range.end()).ok()?;
    (start <= end && end < body.len()).then(|| body.slice(start..=end))
}

fn content_range(range: &RangeInclusive<u64>, len: u64) -> HeaderValue {
    HeaderValue::try_from(format!("bytes {}-{}/{len}", range.start(), range.end()))
        .unwrap_or_else(|_| HeaderValue::from_static("bytes */0"))
}

fn content_range_unsatisfied(len: u64) -> HeaderValue {
    HeaderValue::try_from(format!("bytes */{len}"))
        .unwrap_or_else(|_| HeaderValue::from_static("bytes */0"))
}

/// How often a fresh boundary is drawn when the one drawn occurs in a part.
const BOUNDARY_DRAWS: usize = 4;

/// A `multipart/byteranges` body (RFC 9110 §14.6): each part with the
/// stored `Content-Type` and its `Content-Range`, separated by a random
/// boundary that occurs in no part.
fn multipart(ranges: &[RangeInclusive<u64>], headers: &HeaderMap, body: &Bytes) -> Option<Partial> {
    let parts: Vec<(Bytes, HeaderValue)> = ranges
        .iter()
        .map(|r| Some((slice(body, r)?, content_range(r, body.len() as u64))))
        .collect::<Option<_>>()?;
    let boundary = (0..BOUNDARY_DRAWS)
        .map(|_| format!("fence{:032x}", fastrand::u128(..)))
        .find(|b| !parts.iter().any(|(part, _)| contains(part, b.as_bytes())))?;
    let content_type = headers.get(header::CONTENT_TYPE);
    let mut out = BytesMut::new();
    for (part, range) in &parts {
        out.put_slice(b"--");
        out.put_slice(boundary.as_bytes());
        out.put_slice(b"\r\n");
        if let Some(content_type) = content_type {
            out.put_slice(b"content-type: ");
            out.put_slice(content_type.as_bytes());
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"content-range: ");
        out.put_slice(range.as_bytes());
        out.put_slice(b"\r\n\r\n");
        out.put_slice(part);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"--");
    out.put_slice(boundary.as_bytes());
    out.put_slice(b"--\r\n");
    let body = out.freeze();
    let mut headers = headers.clone();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::try_from(format!("multipart/byteranges; boundary={boundary}")).ok()?,
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.remove(header::CONTENT_RANGE);
    Some(Partial {
        status: StatusCode::PARTIAL_CONTENT,
        headers,
        body,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use crate::policy::Freshness;

    fn entry(headers: &[(&str, &str)], body: &'static str) -> Entry {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        Entry::new(
            StatusCode::OK,
            map,
            Bytes::from_static(body.as_bytes()),
            None,
            &Freshness::expired(0),
            Instant::now(),
            Vec::new(),
        )
    }

    fn request(headers: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    const BODY: &str = "0123456789";

    #[test]
    fn single_ranges_select_bytes() {
        let e = entry(&[], BODY);
        let ranges = |r| select(&e, &request(&[("range", r)]));
        assert_eq!(ranges("bytes=0-3"), Selected::Ranges(vec![0..=3]));
        assert_eq!(ranges("bytes=7-"), Selected::Ranges(vec![7..=9]));
        assert_eq!(ranges("bytes=-2"), Selected::Ranges(vec![8..=9]));
        assert_eq!(ranges("bytes=5-100"), Selected::Ranges(vec![5..=9]));
        assert_eq!(ranges("bytes=-100"), Selected::Ranges(vec![0..=9]));
        assert_eq!(ranges("bytes=10-"), Selected::Unsatisfiable);
        assert_eq!(ranges("bytes=10-20, 30-40"), Selected::Unsatisfiable);
    }

    #[test]
    fn bad_or_abusive_ranges_are_ignored() {
        let e = entry(&[], BODY);
        let ranges = |r| select(&e, &request(&[("range", r)]));
        assert_eq!(ranges("items=0-3"), Selected::Full);
        assert_eq!(ranges("bytes=3-1"), Selected::Full);
        assert_eq!(ranges("bytes=abc"), Selected::Full);
        // More than two overlapping.
        assert_eq!(ranges("bytes=0-5, 1-5, 2-5"), Selected::Full);
        // More bytes asked than the body holds.
        assert_eq!(ranges("bytes=0-8, 5-9"), Selected::Full);
        let many: Vec<String> = (0..=MAX_RANGES).map(|i| format!("{i}-{i}")).collect();
        let e = entry(&[], "0123456789abcdefghijklmnopqrstuvwxyz");
        let header = format!("bytes={}", many.join(","));
        assert_eq!(select(&e, &request(&[("range", &header)])), Selected::Full);
        // Two Range lines.
        let e = entry(&[], BODY);
        let two = request(&[("range", "bytes=0-1"), ("range", "bytes=2-3")]);
        assert_eq!(select(&e, &two), Selected::Full);
    }

    #[test]
    fn accept_ranges_none_is_respected() {
        let e = entry(&[("accept-ranges", "none")], BODY);
        assert_eq!(
            select(&e, &request(&[("range", "bytes=0-1")])),
            Selected::Full
        );
    }

    #[test]
    fn if_range_needs_a_strong_matching_etag() {
        let e = entry(&[("etag", "\"v1\"")], BODY);
        let with = |v| request(&[("range", "bytes=0-1"), ("if-range", v)]);
        assert!(matches!(select(&e, &with("\"v1\"")), Selected::Ranges(_)));
        assert_eq!(select(&e, &with("\"v2\"")), Selected::Full);
        assert_eq!(select(&e, &with("W/\"v1\"")), Selected::Full);
        let weak = entry(&[("etag", "W/\"v1\"")], BODY);
        assert_eq!(select(&weak, &with("\"v1\"")), Selected::Full);
        assert_eq!(select(&weak, &with("W/\"v1\"")), Selected::Full);
    }

    #[test]
    fn if_range_date_must_be_strong_and_exact() {
        let lm = "Sun, 06 Nov 1994 08:49:37 GMT";
        let strong = entry(
            &[
                ("last-modified", lm),
                ("date", "Sun, 06 Nov 1994 08:49:38 GMT"),
            ],
            BODY,
        );
        let weak = entry(&[("last-modified", lm), ("date", lm)], BODY);
        let with = |v| request(&[("range", "bytes=0-1"), ("if-range", v)]);
        assert!(matches!(select(&strong, &with(lm)), Selected::Ranges(_)));
        assert_eq!(
            select(&strong, &with("Sun, 06 Nov 1994 08:49:36 GMT")),
            Selected::Full
        );
        assert_eq!(select(&weak, &with(lm)), Selected::Full);
    }

    #[test]
    fn single_partial_has_content_range_and_length() {
        let body = Bytes::from_static(BODY.as_bytes());
        let p = partial(&Selected::Ranges(vec![2..=4]), &HeaderMap::new(), &body).unwrap();
        assert_eq!(p.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(p.body, "234");
        assert_eq!(p.headers["content-range"], "bytes 2-4/10");
        assert_eq!(p.headers["content-length"], "3");
        let p = partial(&Selected::Unsatisfiable, &HeaderMap::new(), &body).unwrap();
        assert_eq!(p.status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(p.headers["content-range"], "bytes */10");
    }

    #[test]
    fn multipart_parts_and_length_are_exact() {
        let body = Bytes::from_static(BODY.as_bytes());
        let headers = request(&[("content-type", "text/plain")]);
        let p = partial(&Selected::Ranges(vec![0..=1, 8..=9]), &headers, &body).unwrap();
        assert_eq!(p.status, StatusCode::PARTIAL_CONTENT);
        let ct = p.headers["content-type"].to_str().unwrap();
        let boundary = ct.strip_prefix("multipart/byteranges; boundary=").unwrap();
        let expected = format!(
            "--{boundary}\r\ncontent-type: text/plain\r\ncontent-range: bytes 0-1/10\r\n\r\n01\r\n\
             --{boundary}\r\ncontent-type: text/plain\r\ncontent-range: bytes 8-9/10\r\n\r\n89\r\n\
             --{boundary}--\r\n"
        );
        assert_eq!(p.body, expected.as_bytes());
        assert_eq!(
            p.headers["content-length"],
            expected.len().to_string().as_str()
        );
    }

    #[test]
    fn boundary_never_occurs_in_a_part() {
        // Whatever the body, a boundary found is absent from every part.
        let body = Bytes::from(b"--fence".repeat(64));
        let p = partial(
            &Selected::Ranges(vec![0..=9, 20..=29]),
            &HeaderMap::new(),
            &body,
        )
        .unwrap();
        let ct = p.headers["content-type"].to_str().unwrap();
        let boundary = ct.rsplit('=').next().unwrap();
        assert!(!contains(&body, boundary.as_bytes()));
    }
}
