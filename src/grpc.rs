//! gRPC calls: telling them apart, reading a unary call's request message
//! for its key (and handing it on intact), and whether a response may be
//! stored.
//!
//! A gRPC call is a `POST` with `content-type: application/grpc` (or
//! `application/grpc+proto`, `application/grpc;…`). Its request and response
//! bodies are length-prefixed messages (one flag byte, four length bytes,
//! the message), and its outcome is `grpc-status` in the trailers, or in the
//! headers of a trailers-only response. Only calls a
//! [`Rule::grpc`](crate::policy::rules::Rule::grpc) names are ever cached;
//! a call is treated as unary only when its request body is one message that
//! ends within bounds, and a response is stored only when it is one message
//! with `grpc-status: 0`. Everything else passes through.

use std::any::Any;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};

use crate::body::into_bytes;
use crate::entry::Entry;

/// Whether a request or response is gRPC over HTTP/2 (`application/grpc`,
/// `application/grpc+proto`, `application/grpc;…`), not gRPC-Web.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    content_type(headers).is_some_and(|ct| {
        ct.strip_prefix("application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
    })
}

/// Whether a request is gRPC or gRPC-Web (`application/grpc…`).
pub(crate) fn is_grpc_family(headers: &HeaderMap) -> bool {
    content_type(headers).is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Whether a request is gRPC-Web (`application/grpc-web`,
/// `application/grpc-web-text`, with any suffix).
pub(crate) fn is_grpc_web(headers: &HeaderMap) -> bool {
    content_type(headers).is_some_and(|ct| ct.starts_with("application/grpc-web"))
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.trim().to_ascii_lowercase())
}

/// The `grpc-status` of `headers`, if it has one (unparsable: `Some(None)`).
fn status_of(headers: &HeaderMap) -> Option<Option<u32>> {
    headers
        .get("grpc-status")
        .map(|v| v.to_str().ok().and_then(|v| v.trim().parse().ok()))
}

/// Whether a response head already says the call failed (a trailers-only
/// response whose `grpc-status` is not `0`, or does not parse).
pub(crate) fn head_failed(headers: &HeaderMap) -> bool {
    status_of(headers).is_some_and(|status| status != Some(0))
}

/// Whether a whole gRPC response succeeded: `grpc-status: 0` in the
/// trailers or, with no trailers, in the headers (trailers-only). No
/// status at all is not a success.
pub(crate) fn succeeded(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> bool {
    if head_failed(headers) {
        return false;
    }
    match trailers.and_then(status_of) {
        Some(status) => status == Some(0),
        None => status_of(headers) == Some(Some(0)),
    }
}

/// How many whole length-prefixed messages `body` holds; `None` when it is
/// not a sequence of whole messages.
pub(crate) fn messages(body: &[u8]) -> Option<usize> {
    let mut rest = body;
    let mut count = 0usize;
    while !rest.is_empty() {
        if rest.len() < 5 || rest[0] > 1 {
            return None;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        rest = rest[5..].get(len..)?;
        count += 1;
    }
    Some(count)
}

/// Whether an entry may be stored and shared: any response that is not
/// gRPC; a gRPC response only when it is one message (a unary answer) that
/// succeeded (`grpc-status: 0`).
pub(crate) fn storable(entry: &Entry) -> bool {
    !is_grpc(&entry.headers)
        || (succeeded(&entry.headers, entry.trailers.as_deref())
            && messages(&entry.body) == Some(1))
}

/// The key part of a request message: a SHA-256 of its bytes as they came
/// (compressed ones as compressed), with the metadata that says how the
/// message and its answer are encoded (`grpc-encoding`,
/// `grpc-accept-encoding`, `grpc-message-type`).
pub(crate) fn key_part(message: &[u8], headers: &HeaderMap) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(b"grpc message v1");
    hasher.update((message.len() as u64).to_be_bytes());
    hasher.update(message);
    for name in ["grpc-encoding", "grpc-accept-encoding", "grpc-message-type"] {
        let values: Vec<_> = headers.get_all(name).iter().collect();
        hasher.update((values.len() as u64).to_be_bytes());
        for value in values {
            hasher.update((value.len() as u64).to_be_bytes());
            hasher.update(value.as_bytes());
        }
    }
    let mut part = b"grpc-message".to_vec();
    part.extend_from_slice(&hasher.finalize());
    part
}

/// What reading a request body came to.
#[derive(Debug)]
pub(crate) enum Read<B> {
    /// One whole message, ended within the bounds: its bytes, and the body
    /// to hand on (the same bytes).
    Message { message: Bytes, body: B },
    /// Anything else (more than one message, larger than the bound, not
    /// ended in time, an error, a body type the layer cannot rebuild): the
    /// body to hand on, exactly as it came, and why it is not cached.
    Pass { body: B, detail: &'static str },
}

/// Reads a request body of at most `max` bytes that ends within `timeout`.
/// Only body types the layer can hand on again are read: `tonic`'s (with
/// the `tonic` feature) and `http_body_util::Full<Bytes>`; any other is
/// passed untouched (`detail=request-body`).
pub(crate) async fn read_request<B: Send + 'static>(
    body: B,
    max: usize,
    timeout: Duration,
) -> Read<B> {
    #[cfg(feature = "tonic")]
    let body = match cast::<B, tonic::body::Body>(body) {
        Ok(body) => {
            let read = match collect(body, max, timeout).await {
                Collected::Whole(message) => {
                    let body = tonic::body::Body::new(Full::new(message.clone()));
                    Read::Message { message, body }
                }
                Collected::Partial(replay, detail) => Read::Pass {
                    body: tonic::body::Body::new(replay),
                    detail,
                },
            };
            return read_back(read);
        }
        Err(body) => body,
    };
    #[cfg(not(feature = "tonic"))]
    let _ = timeout;
    match cast::<B, Full<Bytes>>(body) {
        Ok(body) => {
            // A `Full` is there at once, and cannot fail.
            let bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            let read = if bytes.len() > max {
                Read::Pass {
                    body: Full::new(bytes),
                    detail: "request-too-large",
                }
            } else if messages(&bytes) != Some(1) {
                Read::Pass {
                    body: Full::new(bytes),
                    detail: "streaming",
                }
            } else {
                Read::Message {
                    message: bytes.clone(),
                    body: Full::new(bytes),
                }
            };
            read_back(read)
        }
        Err(body) => Read::Pass {
            body,
            detail: "request-body",
        },
    }
}

/// `read` of a known body type, as the caller's type (the same type).
fn read_back<T: 'static, B: 'static>(read: Read<T>) -> Read<B> {
    match read {
        Read::Message { message, body } => Read::Message {
            message,
            body: cast_back(body),
        },
        Read::Pass { body, detail } => Read::Pass {
            body: cast_back(body),
            detail,
        },
    }
}

/// `value` as `U`, when `T` is `U`.
fn cast<T: 'static, U: 'static>(value: T) -> Result<U, T> {
    let mut slot = Some(value);
    if let Some(taken) = (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<U>>()
        .and_then(Option::take)
    {
        return Ok(taken);
    }
    match slot {
        Some(value) => Err(value),
        None => unreachable!("a value taken out of its slot is returned"),
    }
}

/// `value` back as the type it was cast from (`T` is `U`: `read_request`
/// only reads bodies it cast).
fn cast_back<T: 'static, U: 'static>(value: T) -> U {
    match cast::<T, U>(value) {
        Ok(value) => value,
        Err(_) => unreachable!("read_request casts back to the type it cast from"),
    }
}

/// A request body read so far.
#[cfg_attr(not(feature = "tonic"), allow(dead_code))]
enum Collected<R: Body> {
    /// One whole message.
    Whole(Bytes),
    /// Not one message within bounds: what was read, then the rest.
    Partial(Replay<R>, &'static str),
}

#[cfg_attr(not(feature = "tonic"), allow(dead_code))]
async fn collect<R>(mut body: R, max: usize, timeout: Duration) -> Collected<R>
where
    R: Body<Data = Bytes> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut read: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut buffer = BytesMut::new();
    let partial = |read, body, error, detail| {
        Collected::Partial(
            Replay {
                read,
                rest: Some(body),
                error,
            },
            detail,
        )
    };
    loop {
        if body.is_end_stream() {
            break;
        }
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            // Not ended in time: a streaming call, or a slow client.
            Err(_) => return partial(read, body, None, "request-timeout"),
            Ok(None) => break,
            Ok(Some(Err(err))) => return partial(read, body, Some(err), "request-body"),
            Ok(Some(Ok(frame))) => frame,
        };
        let frame = frame.map_data(into_bytes);
        match frame.data_ref() {
            Some(data) => {
                buffer.extend_from_slice(data);
                read.push_back(frame);
                if buffer.len() > max {
                    return partial(read, body, None, "request-too-large");
                }
                // A second message: a client-streaming or bidi call.
                if messages_started(&buffer) > 1 {
                    return partial(read, body, None, "streaming");
                }
            }
            // Request trailers are no part of unary gRPC: hand them on.
            None => {
                read.push_back(frame);
                return partial(read, body, None, "request-trailers");
            }
        }
    }
    let message = buffer.freeze();
    if messages(&message) == Some(1) {
        return Collected::Whole(message);
    }
    partial(read, body, None, "streaming")
}

/// How many messages `buffer` has begun (the last may be incomplete).
#[cfg_attr(not(feature = "tonic"), allow(dead_code))]
fn messages_started(buffer: &[u8]) -> usize {
    let mut rest = buffer;
    let mut count = 0;
    while !rest.is_empty() {
        count += 1;
        if rest.len() < 5 {
            break;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        match rest[5..].get(len..) {
            Some(after) => rest = after,
            None => break,
        }
    }
    count
}

/// A request body handed on after it was partly read: the frames read,
/// then the error met (if any), then the rest of the body.
#[cfg_attr(not(feature = "tonic"), allow(dead_code))]
struct Replay<R: Body> {
    read: VecDeque<Frame<Bytes>>,
    rest: Option<R>,
    error: Option<R::Error>,
}

impl<R> Body for Replay<R>
where
    R: Body<Data = Bytes> + Unpin,
    R::Error: Unpin,
{
    type Data = Bytes;
    type Error = R::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, R::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.read.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = this.error.take() {
            this.rest = None;
            return Poll::Ready(Some(Err(error)));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .read
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(read));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn content_types() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/GRPC;charset=x",
        ] {
            assert!(is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpc-web-text",
            "text/plain",
        ] {
            assert!(!is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        assert!(is_grpc_web(&headers(&[(
            "content-type",
            "application/grpc-web-text+proto"
        )])));
    }

    #[test]
    fn status_from_trailers_or_trailers_only_head() {
        let ok = headers(&[("grpc-status", "0")]);
        let internal = headers(&[("grpc-status", "13")]);
        let plain = HeaderMap::new();
        assert!(succeeded(&plain, Some(&ok)));
        assert!(!succeeded(&plain, Some(&internal)));
        assert!(succeeded(&ok, None));
        assert!(!succeeded(&internal, None));
        assert!(!succeeded(&plain, None), "no status is no success");
        assert!(!succeeded(&plain, Some(&headers(&[("grpc-status", "x")]))));
        assert!(
            !succeeded(&internal, Some(&ok)),
            "a failed head stays failed"
        );
        assert!(head_failed(&internal));
        assert!(!head_failed(&plain));
    }

    #[test]
    fn message_framing() {
        let one = message(b"abc");
        assert_eq!(messages(&one), Some(1));
        assert_eq!(messages(&[one.clone(), message(b"")].concat()), Some(2));
        assert_eq!(messages(&one[..one.len() - 1]), None);
        assert_eq!(messages(&[2, 0, 0, 0, 0]), None);
        assert_eq!(messages(b""), Some(0));
        assert_eq!(messages_started(&one[..3]), 1);
        assert_eq!(messages_started(&[one.clone(), vec![0]].concat()), 2);
    }

    #[test]
    fn key_part_covers_message_and_encoding_only() {
        let plain = HeaderMap::new();
        let a = key_part(&message(b"a"), &plain);
        assert_ne!(a, key_part(&message(b"b"), &plain));
        assert_eq!(
            a,
            key_part(&message(b"a"), &headers(&[("grpc-timeout", "1S")]))
        );
        assert_ne!(
            a,
            key_part(
                &message(b"a"),
                &headers(&[("grpc-accept-encoding", "gzip")])
            )
        );
    }

    #[tokio::test]
    async fn full_bodies_are_read_and_handed_on() {
        let one = Bytes::from(message(b"abc"));
        match read_request(Full::new(one.clone()), 1024, Duration::from_secs(1)).await {
            Read::Message { message, body } => {
                assert_eq!(message, one);
                assert_eq!(body.collect().await.unwrap().to_bytes(), one);
            }
            Read::Pass { detail, .. } => panic!("passed: {detail}"),
        }
        let two = Bytes::from([message(b"a"), message(b"b")].concat());
        match read_request(Full::new(two.clone()), 1024, Duration::from_secs(1)).await {
            Read::Pass { body, detail } => {
                assert_eq!(detail, "streaming");
                assert_eq!(body.collect().await.unwrap().to_bytes(), two);
            }
            Read::Message { .. } => panic!("two messages read as one"),
        }
        match read_request(Full::new(one.clone()), 4, Duration::from_secs(1)).await {
            Read::Pass { body, detail } => {
                assert_eq!(detail, "request-too-large");
                assert_eq!(body.collect().await.unwrap().to_bytes(), one);
            }
            Read::Message { .. } => panic!("over the bound"),
        }
        match read_request(String::from("x"), 1024, Duration::from_secs(1)).await {
            Read::Pass { body, detail } => {
                assert_eq!((body.as_str(), detail), ("x", "request-body"));
            }
            Read::Message { .. } => panic!("an unknown body type was read"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_end_in_time_is_handed_on_as_it_came() {
        use futures_util::StreamExt;
        use http_body_util::StreamBody;
        // One message, then nothing (a bidi call waiting for its answer).
        let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
            Bytes::from(message(b"a")),
        ))]);
        let body = StreamBody::new(first.chain(futures_util::stream::pending()));
        match collect(body, 1024, Duration::from_secs(1)).await {
            Collected::Partial(mut replay, detail) => {
                assert_eq!(detail, "request-timeout");
                let frame = replay.frame().await.unwrap().unwrap();
                assert_eq!(frame.into_data().unwrap(), Bytes::from(message(b"a")));
                assert!(!replay.is_end_stream(), "the rest is still to come");
            }
            Collected::Whole(_) => panic!("a body that never ended was read whole"),
        }
    }

    #[tokio::test]
    async fn a_partly_read_body_is_replayed_whole() {
        use http_body_util::StreamBody;
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(message(b"a")))),
            Ok(Frame::data(Bytes::from(message(b"b")))),
            Ok(Frame::data(Bytes::from_static(b"tail"))),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        match collect(body, 1024, Duration::from_secs(1)).await {
            Collected::Partial(replay, detail) => {
                assert_eq!(detail, "streaming");
                let all = replay.collect().await.unwrap().to_bytes();
                assert_eq!(
                    all,
                    [message(b"a"), message(b"b"), b"tail".to_vec()].concat()
                );
            }
            Collected::Whole(_) => panic!("two messages read as one"),
        }
    }
}
