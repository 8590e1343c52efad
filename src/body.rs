//! [`FenceBody`]: cached bytes, or the inner body passed through (and
//! recorded on the way), or streamed from a rebuild that records it.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::mpsc;

/// A complete body, as recorded.
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<Box<HeaderMap>>,
}

/// What to do with a recording once its body ended cleanly.
type OnRecorded = Box<dyn FnOnce(Recorded) + Send>;

/// Collects a body as it is read, up to a size cap. A body that fails, is
/// dropped early or outgrows the cap is never handed on.
pub(crate) struct Recorder {
    max: usize,
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<Box<HeaderMap>>,
    done: Option<OnRecorded>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("max", &self.max)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder of at most `max` bytes that calls `done` with the whole
    /// body when it ended cleanly.
    pub(crate) fn new(max: usize, done: impl FnOnce(Recorded) + Send + 'static) -> Self {
        Recorder {
            max,
            chunks: Vec::new(),
            len: 0,
            trailers: None,
            done: Some(Box::new(done)),
        }
    }

    /// A recorder whose result is taken with [`into_recorded`](Self::into_recorded).
    pub(crate) fn collecting(max: usize) -> Self {
        Recorder {
            max,
            chunks: Vec::new(),
            len: 0,
            trailers: None,
            done: None,
        }
    }

    /// Adds a frame (data or trailers); `false` when the body outgrew the
    /// cap (the recording must then be dropped).
    pub(crate) fn push(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(data) = frame.data_ref() {
            self.len = self.len.saturating_add(data.len());
            if self.len > self.max {
                return false;
            }
            if !data.is_empty() {
                self.chunks.push(data.clone());
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            match &mut self.trailers {
                Some(existing) => existing.extend(trailers.clone()),
                None => self.trailers = Some(Box::new(trailers.clone())),
            }
        }
        true
    }

    /// The body so far, as one value.
    pub(crate) fn into_recorded(mut self) -> Recorded {
        self.done = None;
        Recorded {
            body: crate::entry::concat(std::mem::take(&mut self.chunks), self.len),
            trailers: self.trailers.take(),
        }
    }

    /// The body ended cleanly: hand it on.
    pub(crate) fn finish(mut self) {
        if let Some(done) = self.done.take() {
            done(self.into_recorded());
        }
    }
}

/// What a rebuild sends its leader's client: frames as the origin sends
/// them, then the end, or the rest of the origin's body once recording
/// stopped (too large).
pub(crate) enum Piece<B: Body> {
    Frame(Frame<Bytes>),
    Failed(B::Error),
    Rest(Pin<Box<B>>),
    End,
}

/// The sending side of a streamed body.
pub(crate) type PieceSender<B> = mpsc::UnboundedSender<Piece<B>>;

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
            trailers: Option<Box<HeaderMap>>,
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
        // Frames a rebuild forwards while it records them.
        Streamed {
            rx: mpsc::UnboundedReceiver<Piece<B>>,
            rest: Option<Pin<Box<B>>>,
            hint: SizeHint,
            ended: bool,
        },
    }
}

impl<B: Body> FenceBody<B> {
    /// A body replaying cached bytes, then trailers if any.
    pub(crate) fn cached(data: Bytes, trailers: Option<Box<HeaderMap>>) -> Self {
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

    /// A body streamed from a rebuild: the frames `rx` receives. `hint` is
    /// the origin body's size hint.
    pub(crate) fn streamed(rx: mpsc::UnboundedReceiver<Piece<B>>, hint: SizeHint) -> Self {
        FenceBody {
            kind: Kind::Streamed {
                rx,
                rest: None,
                hint,
                ended: false,
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
            Kind::Streamed { .. } => "Streamed",
        };
        f.debug_struct("FenceBody").field("kind", &kind).finish()
    }
}

/// A data chunk as `Bytes` (no copy when it is `Bytes` already).
pub(crate) fn into_bytes<D: Buf>(mut data: D) -> Bytes {
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
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
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
                        if recorder.as_mut().is_some_and(|rec| !rec.push(&frame)) {
                            // Too large: stop recording, keep streaming.
                            recorder.take();
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
            KindProj::Streamed {
                rx,
                rest,
                hint,
                ended,
            } => loop {
                if let Some(body) = rest {
                    let frame = ready!(body.as_mut().poll_frame(cx));
                    return Poll::Ready(frame.map(|r| r.map(|f| f.map_data(into_bytes))));
                }
                if *ended {
                    return Poll::Ready(None);
                }
                match ready!(rx.poll_recv(cx)) {
                    Some(Piece::Frame(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            *hint = shrink(hint, data.len() as u64);
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Some(Piece::Failed(err)) => {
                        *ended = true;
                        return Poll::Ready(Some(Err(err)));
                    }
                    Some(Piece::Rest(body)) => *rest = Some(body),
                    // `None`: the rebuild task is gone without an end (the
                    // runtime shuts down): end here; a known length makes
                    // the server notice the short body.
                    Some(Piece::End) | None => {
                        *ended = true;
                        return Poll::Ready(None);
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Cached { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Passthrough { body } | Kind::Recording { body, .. } => body.is_end_stream(),
            Kind::Streamed { rest, ended, .. } => match rest {
                Some(body) => body.is_end_stream(),
                None => *ended,
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Cached { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Passthrough { body } | Kind::Recording { body, .. } => body.size_hint(),
            Kind::Streamed { rest, hint, .. } => match rest {
                Some(body) => body.size_hint(),
                None => *hint,
            },
        }
    }
}

/// `hint` after `read` more bytes went by.
fn shrink(hint: &SizeHint, read: u64) -> SizeHint {
    let mut out = SizeHint::new();
    if let Some(upper) = hint.upper() {
        out.set_upper(upper.saturating_sub(read));
    }
    let lower = hint.lower().saturating_sub(read);
    out.set_lower(out.upper().map_or(lower, |upper| lower.min(upper)));
    out
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
            FenceBody::cached(Bytes::from_static(b"abc"), Some(Box::new(trailers.clone())));
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abc"));
    }

    #[tokio::test]
    async fn empty_cached_body_is_at_end() {
        let body: FenceBody<http_body_util::Empty<Bytes>> = FenceBody::cached(Bytes::new(), None);
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
