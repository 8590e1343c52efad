//! The request a rebuild sends to the inner service, what the response's
//! head allows (store, share, or neither), and reading its body while the
//! leader's client receives it.

use std::pin::Pin;
use std::time::Instant;

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;

use crate::body::{into_bytes, Piece, PieceSender, Recorded, Recorder};
use crate::entry::{flags, Entry};
use crate::flow::Keyed;
use crate::grpc;
use crate::invalidate;
use crate::policy::{self, Freshness};
use crate::respond::vary_values;
use crate::shared::Shared;
use crate::unreachable::OriginUnreachable;
use crate::validation;

/// What a rebuild keeps of the client's request before it turns it into
/// the request it sends.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The client's headers: for `Vary` and the client's own validators.
    pub(crate) request_headers: HeaderMap,
    pub(crate) path: String,
    /// The index sets a lease or permit of the key joins.
    pub(crate) lease_sets: Vec<String>,
}

/// Turns the client's request into the request a rebuild sends: a `GET`
/// (a refresh may start from a `HEAD`) without the client's validators,
/// since its answer is for everyone; with `current`'s validators when
/// there is a stored entry to revalidate (RFC 9111 §4.3.1).
pub(crate) fn prepare<B>(
    shared: &Shared,
    req: &mut Request<B>,
    current: Option<&Entry>,
) -> Prepared {
    let request_headers = req.headers().clone();
    let path = req.uri().path().to_owned();
    let lease_sets = invalidate::lease_sets(shared, &path);
    // A gRPC call is sent as it came: a `POST` with its message, no
    // validators (its responses have none).
    if req.method() == Method::POST && grpc::is_grpc(req.headers()) {
        return Prepared {
            request_headers,
            path,
            lease_sets,
        };
    }
    *req.method_mut() = Method::GET;
    let headers = req.headers_mut();
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        headers.remove(name);
    }
    if let Some(current) = current {
        for (name, value) in validation::conditional_headers(current) {
            headers.insert(name, value);
        }
    }
    Prepared {
        request_headers,
        path,
        lease_sets,
    }
}

/// What the head of the inner service's answer allows.
pub(crate) enum Head<RB, E> {
    /// The inner service failed.
    Failed(E),
    /// The origin answered 5xx (or could not be reached) and a stale entry
    /// may be served instead; `detail` says which.
    OriginError { detail: &'static str },
    /// `304 Not Modified` to a revalidation: the stored entry, refreshed;
    /// `storable` when its new headers allow storing it.
    NotModified {
        entry: Entry,
        storable: bool,
        tags: Vec<String>,
    },
    /// A response only the leader's client may have (`remember`: the key is
    /// likely to stay so: hit-for-miss).
    Unshared {
        response: Response<RB>,
        reason: &'static str,
        remember: bool,
    },
    /// A response whose body is to be read and shared: stored with
    /// `Some(freshness)`, given to the current waiters only with `None`
    /// (an error response).
    Share {
        parts: http::response::Parts,
        body: RB,
        freshness: Option<Freshness>,
        tags: Vec<String>,
    },
}

/// Classifies the inner service's answer to a rebuild of `keyed`.
/// `current` is the stored entry being revalidated, `stale_on_error`
/// whether it may be served if the origin fails.
pub(crate) fn classify<RB: Body, E>(
    keyed: &Keyed,
    answer: Result<Response<RB>, E>,
    current: Option<&Entry>,
    stale_on_error: bool,
    now_ms: u64,
    started: Instant,
) -> Head<RB, E> {
    let shared = &keyed.shared;
    let response = match answer {
        Ok(response) => response,
        Err(err) => return Head::Failed(err),
    };
    let (mut parts, body) = response.into_parts();
    if keyed.overrides.strip_set_cookie {
        parts.headers.remove(header::SET_COOKIE);
    }
    let tags = invalidate::tags(shared, &parts.headers);
    invalidate::strip_tags(shared, &mut parts.headers);
    if parts.status.is_server_error() {
        // A disconnected cache may serve what it holds (RFC 9111 §4.2.4),
        // unless the entry says it must be revalidated first.
        let unreachable = parts.extensions.get::<OriginUnreachable>().is_some()
            && current.is_some_and(|c| !c.has(flags::REVALIDATE) && !c.has(flags::NO_STALE));
        if unreachable {
            return Head::OriginError {
                detail: "origin-unreachable",
            };
        }
        if stale_on_error {
            return Head::OriginError {
                detail: "stale-if-error",
            };
        }
    }
    let now = shared.clock.now();
    if parts.status == StatusCode::NOT_MODIFIED {
        if let Some(current) = current {
            // RFC 9111 §4.3.4: the stored response, with the 304's headers.
            shared.bump(|c| &c.revalidated);
            let merged = policy::storable_headers(&validation::merge_not_modified(
                &current.headers,
                &parts.headers,
            ));
            let verdict = policy::storability(
                &shared.policy,
                &keyed.overrides,
                current.status,
                &merged,
                &keyed.facts,
                now,
            );
            let storable = verdict.is_ok();
            let freshness = verdict.unwrap_or_else(|_| Freshness::expired(now_ms));
            let entry = Entry::new(
                current.status,
                merged,
                current.body.clone(),
                current.trailers.clone(),
                &freshness,
                started,
                current.vary.clone(),
            );
            return Head::NotModified {
                entry,
                storable,
                tags,
            };
        }
    }
    let unshared = |parts, body, reason, remember| Head::Unshared {
        response: Response::from_parts(parts, body),
        reason,
        remember,
    };
    if grpc::is_grpc(&parts.headers) && grpc::head_failed(&parts.headers) {
        // A failed call (trailers-only): for its own caller only; the
        // waiters call again, one at a time, not with hit-for-miss.
        return unshared(parts, body, "grpc-status", false);
    }
    if is_event_stream(&parts.headers) {
        // A stream has no end to wait for: never recorded, never shared.
        return unshared(parts, body, "streaming", true);
    }
    let verdict = policy::storability(
        &shared.policy,
        &keyed.overrides,
        parts.status,
        &parts.headers,
        &keyed.facts,
        now,
    );
    let freshness = match verdict {
        Ok(freshness) => Some(freshness),
        // An error response may be given to the current waiters (a failing
        // origin sees one request per rebuild), unless it is personal.
        Err(reason)
            if parts.status.is_server_error()
                && !matches!(
                    reason,
                    "private"
                        | "no-store"
                        | "set-cookie"
                        | "vary-star"
                        | "authorization"
                        | "cookie"
                        | "cache-control"
                ) =>
        {
            None
        }
        Err(reason) => return unshared(parts, body, reason, true),
    };
    if body.size_hint().lower() > shared.max_body_size as u64 {
        return unshared(parts, body, "too-large", true);
    }
    Head::Share {
        parts,
        body,
        freshness,
        tags,
    }
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

/// The entry of a shared response whose body was read.
pub(crate) fn entry_of(
    parts: &http::response::Parts,
    recorded: Recorded,
    freshness: Option<Freshness>,
    request_headers: &HeaderMap,
    now_ms: u64,
    started: Instant,
) -> Entry {
    let headers = policy::storable_headers(&parts.headers);
    let vary = match freshness {
        Some(_) => {
            let names = policy::vary_names(&parts.headers).unwrap_or_default();
            vary_values(&names, request_headers)
        }
        None => Vec::new(),
    };
    Entry::new(
        parts.status,
        headers,
        recorded.body,
        recorded.trailers,
        &freshness.unwrap_or_else(|| Freshness::expired(now_ms)),
        started,
        vary,
    )
}

/// How reading a body while forwarding it ended.
pub(crate) enum Teed {
    /// The whole body, read within the cap.
    Complete(Recorded),
    /// Past the cap, the body failed, or the deadline passed: the client
    /// got (or gets) the rest directly; nothing is shared.
    Incomplete(&'static str),
}

/// What the body had ready at once, before the head was answered.
pub(crate) enum Early<B: Body> {
    /// The whole body was there (the usual case for a handler that returns
    /// its bytes): the entry can be settled before the client gets the head.
    Complete(Recorded),
    /// The body is still coming: stream it, `read` first; `stop` when the
    /// recording already ended (too large, failed).
    Streaming {
        body: Pin<Box<B>>,
        recorder: Recorder,
        read: Vec<Piece<B>>,
        stop: Option<&'static str>,
    },
}

/// Reads what `body` has ready without waiting.
pub(crate) fn read_ready<B: Body>(body: B, max: usize) -> Early<B> {
    let mut body = Box::pin(body);
    let mut recorder = Recorder::collecting(max);
    let mut read = Vec::new();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let stop = loop {
        if body.is_end_stream() {
            return Early::Complete(recorder.into_recorded());
        }
        match body.as_mut().poll_frame(&mut cx) {
            std::task::Poll::Pending => break None,
            std::task::Poll::Ready(None) => return Early::Complete(recorder.into_recorded()),
            std::task::Poll::Ready(Some(Err(err))) => {
                read.push(Piece::Failed(err));
                break Some("body-error");
            }
            std::task::Poll::Ready(Some(Ok(frame))) => {
                let frame = frame.map_data(into_bytes);
                let over = !recorder.push(&frame);
                read.push(Piece::Frame(frame));
                if over {
                    break Some("too-large");
                }
            }
        }
    };
    Early::Streaming {
        body,
        recorder,
        read,
        stop,
    }
}

/// Reads the rest of `body` into `recorder`, forwarding each frame to the
/// leader's client through `tx` as it comes (the caller sends the end,
/// once the entry is settled, so a client that read the whole body finds
/// it stored); past the cap or `deadline` the rest of the body is handed to
/// the client to read directly. The client hanging up does not stop the
/// reading: its waiters still get the entry.
pub(crate) async fn tee<B>(
    mut body: Pin<Box<B>>,
    mut recorder: Recorder,
    tx: &PieceSender<B>,
    deadline: tokio::time::Instant,
) -> Teed
where
    B: Body,
{
    loop {
        if body.is_end_stream() {
            return Teed::Complete(recorder.into_recorded());
        }
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(frame) => frame,
            Err(_) => return hand_over(body, tx, "rebuild-timeout"),
        };
        let frame = match frame {
            None => return Teed::Complete(recorder.into_recorded()),
            Some(Err(err)) => {
                let _ = tx.send(Piece::Failed(err));
                return Teed::Incomplete("body-error");
            }
            Some(Ok(frame)) => frame.map_data(into_bytes),
        };
        let recorded = recorder.push(&frame);
        let _ = tx.send(Piece::Frame(frame));
        if !recorded {
            return hand_over(body, tx, "too-large");
        }
    }
}

pub(crate) fn hand_over<B: Body>(
    body: Pin<Box<B>>,
    tx: &PieceSender<B>,
    why: &'static str,
) -> Teed {
    // If the client is gone, the body is dropped here.
    let _ = tx.send(Piece::Rest(body));
    Teed::Incomplete(why)
}

/// Reads a whole body up to `max` bytes (a background refresh has no
/// client to forward to).
pub(crate) async fn read<B: Body>(
    body: B,
    max: usize,
    deadline: tokio::time::Instant,
) -> Option<Recorded> {
    let mut body = Box::pin(body);
    let mut recorder = Recorder::collecting(max);
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame()).await.ok()?;
        let Some(frame) = frame else {
            return Some(recorder.into_recorded());
        };
        if !recorder.push(&frame.ok()?.map_data(into_bytes)) {
            return None;
        }
    }
}
