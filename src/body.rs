//! [`FenceBody`]: cached bytes, or the inner body passed through.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::fill::Recorder;

pin_project! {
    /// The response body of [`FenceService`](crate::FenceService): bytes
    /// from the cache (and their trailers), or the inner service's body
    /// passed through frame by frame, recorded for the cache on the way when
    /// the response is to be stored. Its error type is the inner body's.
    pub struct FenceBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        Cached {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
        Passthrough {
            #[pin]
            body: B,
        },
        Recording {
            #[pin]
            body: B,
            recorder: Option<Recorder>,
        },
        // What was read of a body while trying to cache it, then the rest
        // of it (or the error that stopped the reading).
        Replay {
            prefix: VecDeque<Bytes>,
            error: Option<B::Error>,
            rest: Option<Pin<Box<B>>>,
        },
    }
}

impl<B: Body> FenceBody<B> {
    /// A body replaying cached bytes, then trailers if any.
    pub(crate) fn cached(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        FenceBody {
            kind: Kind::Cached {
                data: Some(data).filter(|d| !d.is_empty()),
                trailers,
            },
        }
    }

    /// The inner body, untouched.
    pub(crate) fn passthrough(body: B) -> Self {
        FenceBody {
            kind: Kind::Passthrough { body },
        }
    }

    /// The chunks already read from a body, then the rest of it (`rest`),
    /// or the error that stopped the reading (`error`).
    pub(crate) fn replay(
        prefix: Vec<Bytes>,
        rest: Option<Pin<Box<B>>>,
        error: Option<B::Error>,
    ) -> Self {
        FenceBody {
            kind: Kind::Replay {
                prefix: prefix.into(),
                error,
                rest,
            },
        }
    }

    /// The inner body, recorded into `recorder` as the client reads it.
    pub(crate) fn recording(body: B, recorder: Recorder) -> Self {
        if body.is_end_stream() {
            // Nothing will be polled: the (empty) response is complete now.
            recorder.finish();
            return FenceBody::passthrough(body);
        }
        FenceBody {
            kind: Kind::Recording {
                body,
                recorder: Some(recorder),
            },
        }
    }
}

impl<B: Body> fmt::Debug for FenceBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Cached { .. } => "Cached",
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Recording { .. } => "Recording",
            Kind::Replay { .. } => "Replay",
        };
        f.debug_struct("FenceBody").field("kind", &kind).finish()
    }
}

fn into_bytes<D: Buf>(mut data: D) -> Bytes {
    data.copy_to_bytes(data.remaining())
}

impl<B> Body for FenceBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Cached { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KindProj::Passthrough { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|r| r.map(|f| f.map_data(into_bytes))))
            }
            KindProj::Recording { mut body, recorder } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                match frame {
                    None => {
                        if let Some(recorder) = recorder.take() {
                            recorder.finish();
                        }
                        Poll::Ready(None)
                    }
                    Some(Err(err)) => {
                        // A body that fails is never stored.
                        recorder.take();
                        Poll::Ready(Some(Err(err)))
                    }
                    Some(Ok(frame)) => {
                        let frame = frame.map_data(into_bytes);
                        if let Some(rec) = recorder.as_mut() {
                            if let Some(data) = frame.data_ref() {
                                if !rec.push_data(data) {
                                    // Too large: stop recording, keep streaming.
                                    recorder.take();
                                }
                            } else if let Some(trailers) = frame.trailers_ref() {
                                rec.push_trailers(trailers);
                            }
                        }
                        if body.is_end_stream() {
                            if let Some(recorder) = recorder.take() {
                                recorder.finish();
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                }
            }
            KindProj::Replay {
                prefix,
                error,
                rest,
            } => {
                if let Some(chunk) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if let Some(err) = error.take() {
                    return Poll::Ready(Some(Err(err)));
                }
                match rest {
                    Some(body) => {
                        let frame = ready!(body.as_mut().poll_frame(cx));
                        if frame.is_none() {
                            *rest = None;
                        }
                        Poll::Ready(frame.map(|r| r.map(|f| f.map_data(into_bytes))))
                    }
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Cached { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Passthrough { body } | Kind::Recording { body, .. } => body.is_end_stream(),
            Kind::Replay {
                prefix,
                error,
                rest,
            } => {
                prefix.is_empty()
                    && error.is_none()
                    && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Cached { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Passthrough { body } | Kind::Recording { body, .. } => body.size_hint(),
            Kind::Replay { prefix, rest, .. } => {
                let buffered: u64 = prefix.iter().map(|c| c.len() as u64).sum();
                let rest = rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint());
                // Upper first: `SizeHint` asserts lower <= upper on each set.
                let mut hint = SizeHint::new();
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(buffered));
                }
                hint.set_lower(rest.lower().saturating_add(buffered));
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn cached_body_yields_data_then_trailers_with_exact_size() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body: FenceBody<http_body_util::Empty<Bytes>> =
            FenceBody::cached(Bytes::from_static(b"abc"), Some(trailers.clone()));
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abc"));
    }

    #[tokio::test]
    async fn replay_yields_the_prefix_then_the_rest() {
        let rest = Box::pin(http_body_util::Full::new(Bytes::from_static(b"cd")));
        let body = FenceBody::replay(
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            Some(rest),
            None,
        );
        assert_eq!(body.size_hint().exact(), Some(4));
        assert_eq!(
            body.collect().await.unwrap().to_bytes(),
            Bytes::from_static(b"abcd")
        );
    }

    #[tokio::test]
    async fn replay_ends_with_the_error_that_stopped_reading() {
        let body: FenceBody<http_body_util::Full<Bytes>> =
            FenceBody::replay(vec![Bytes::from_static(b"a")], None, None);
        assert_eq!(
            body.collect().await.unwrap().to_bytes(),
            Bytes::from_static(b"a")
        );
        #[derive(Debug)]
        struct Failing;
        impl Body for Failing {
            type Data = Bytes;
            type Error = &'static str;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
                Poll::Ready(Some(Err("broken")))
            }
        }
        let body =
            FenceBody::<Failing>::replay(vec![Bytes::from_static(b"a")], None, Some("broken"));
        assert_eq!(body.collect().await.unwrap_err(), "broken");
    }

    #[tokio::test]
    async fn empty_cached_body_is_at_end() {
        let body: FenceBody<http_body_util::Empty<Bytes>> = FenceBody::cached(Bytes::new(), None);
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
