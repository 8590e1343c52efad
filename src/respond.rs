//! Turning entries and outcomes into responses.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::Body;

use crate::body::FenceBody;
use crate::entry::Entry;
use crate::range;
use crate::status::{decimal_value, CacheStatus};
use crate::validation;
use crate::vary;

/// A response built from an entry, `now_ms` being the time now. `with_age`
/// adds `Age` (RFC 9111 §5.1) for responses served from the cache; `head`
/// leaves the body out; `conditional` holds the request's headers when its
/// validators are to be evaluated: a match gives `304 Not Modified`
/// (RFC 9110 §13.2); else its `Range` (with `If-Range`) gives `206` or
/// `416` from a stored `200` (RFC 9110 §14, see [`range`]).
pub(crate) fn entry_response<B: Body>(
    entry: Entry,
    now_ms: u64,
    head: bool,
    status: CacheStatus,
    with_age: bool,
    conditional: Option<&HeaderMap>,
) -> Response<FenceBody<B>> {
    let age = entry.age_secs(now_ms);
    if conditional.is_some_and(|request| validation::not_modified(&entry, request)) {
        let mut response = Response::new(FenceBody::cached(Bytes::new(), None));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.headers_mut() = validation::not_modified_headers(&entry.headers);
        if with_age {
            response
                .headers_mut()
                .insert(header::AGE, decimal_value(age));
        }
        status.stamp(&mut response);
        return response;
    }
    // RFC 9110 §14.2: ranges are defined for `GET` only (a `HEAD` with
    // `Range` gets the full response's head).
    let selected = match conditional {
        Some(request) if !head => range::select(&entry, request),
        _ => range::Selected::Full,
    };
    if let Some(partial) = range::partial(&selected, &entry.headers, &entry.body) {
        let mut response = Response::new(FenceBody::cached(partial.body, None));
        *response.status_mut() = partial.status;
        *response.headers_mut() = partial.headers;
        if with_age {
            response
                .headers_mut()
                .insert(header::AGE, decimal_value(age));
        }
        status.stamp(&mut response);
        return response;
    }
    let body_len = entry.body.len();
    let body = if head {
        FenceBody::cached(Bytes::new(), None)
    } else {
        FenceBody::cached(entry.body, entry.trailers)
    };
    let mut response = Response::new(body);
    *response.status_mut() = entry.status;
    *response.headers_mut() = entry.headers;
    let headers = response.headers_mut();
    // A full `200` says that its ranges may be asked for (RFC 9110 §14.3),
    // unless its origin said otherwise. One lookup per field (`entry`, not
    // `contains_key` then `insert`); a map at its size limit gets nothing
    // added rather than a panic.
    if entry.status == StatusCode::OK {
        if let Ok(field) = headers.try_entry(header::ACCEPT_RANGES) {
            let _ = field.or_try_insert_with(|| HeaderValue::from_static("bytes"));
        }
    }
    if may_have_content_length(entry.status) {
        if let Ok(field) = headers.try_entry(header::CONTENT_LENGTH) {
            let _ = field.or_try_insert_with(|| decimal_value(body_len as u64));
        }
    }
    if with_age {
        let _ = headers.try_insert(header::AGE, decimal_value(age));
    }
    status.stamp(&mut response);
    response
}

/// [`entry_response`] for an entry others may hold too.
pub(crate) fn shared_entry_response<B: Body>(
    entry: Arc<Entry>,
    now_ms: u64,
    head: bool,
    status: CacheStatus,
    with_age: bool,
    conditional: Option<&HeaderMap>,
) -> Response<FenceBody<B>> {
    let entry = Arc::try_unwrap(entry).unwrap_or_else(|shared| Entry::clone(&shared));
    entry_response(entry, now_ms, head, status, with_age, conditional)
}

/// A stale entry served instead of a fresh one, saying why in `detail`.
pub(crate) fn stale_response<B: Body>(
    stale: &Arc<Entry>,
    now_ms: u64,
    head: bool,
    mut status: CacheStatus,
    detail: &'static str,
    conditional: Option<&HeaderMap>,
) -> Response<FenceBody<B>> {
    status.hit = status.fwd.is_none();
    status.ttl = Some(stale.ttl_ms(now_ms).div_euclid(1000));
    status.detail = Some(detail);
    status.served_stale = true;
    entry_response(Entry::clone(stale), now_ms, head, status, true, conditional)
}

fn may_have_content_length(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// A small response the cache makes itself.
fn own<B: Body>(
    code: StatusCode,
    text: &'static str,
    status: CacheStatus,
) -> Response<FenceBody<B>> {
    let mut response = Response::new(FenceBody::cached(Bytes::from_static(text.as_bytes()), None));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    if !text.is_empty() {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    status.stamp(&mut response);
    response
}

/// The answer to `only-if-cached` when nothing usable is stored
/// (RFC 9111 §5.2.1.7).
pub(crate) fn only_if_cached_miss<B: Body>() -> Response<FenceBody<B>> {
    own(
        StatusCode::GATEWAY_TIMEOUT,
        "",
        CacheStatus {
            detail: Some("only-if-cached"),
            ..CacheStatus::default()
        },
    )
}

/// The answer when a rebuild task was cancelled (the runtime shuts down).
pub(crate) fn unavailable<B: Body>() -> Response<FenceBody<B>> {
    own(
        StatusCode::SERVICE_UNAVAILABLE,
        "rebuild cancelled\n",
        CacheStatus::bypass("rebuild-cancelled"),
    )
}

/// The answer of a request that waited for a rebuild whose call to the
/// inner service failed: the error itself cannot be copied, and calling
/// the inner service again for each waiter is the stampede the flight
/// exists to prevent.
pub(crate) fn origin_failed<B: Body>(status: CacheStatus) -> Response<FenceBody<B>> {
    own(StatusCode::BAD_GATEWAY, "origin error\n", status)
}

/// The request's values for the headers a stored response varies on:
/// all field lines joined by `, `, normalised (see [`vary`]); `None` for an
/// absent header.
pub(crate) fn vary_values(
    names: &[HeaderName],
    request: &HeaderMap,
) -> Vec<(HeaderName, Option<HeaderValue>)> {
    names
        .iter()
        .map(|name| (name.clone(), vary::value(request, name)))
        .collect()
}

/// Whether the request has the values of the headers the entry varies on
/// (both normalised: an entry stored before normalisation may miss once).
pub(crate) fn vary_matches(entry: &Entry, request: &HeaderMap) -> bool {
    entry.vary.iter().all(|(name, stored)| {
        let stored = stored.as_ref().map(|v| vary::normalise(name, v));
        vary::value(request, name) == stored
    })
}
