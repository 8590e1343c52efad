//! The response future of [`FenceService`](crate::FenceService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::FenceBody;
use crate::service::{finish, resolve, LookupFuture, Miss, Outcome, Resolved};

pin_project! {
    /// Response future of [`FenceService`](crate::FenceService): a store
    /// lookup, then either a cached response or the inner service's.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Lookup {
            lookup: LookupFuture,
            pending: Option<Pending<S, B>>,
        },
        Inner {
            #[pin]
            fut: S::Future,
            outcome: Option<Outcome>,
        },
        Done,
    }
}

/// The readied inner service and the request, held during the lookup.
struct Pending<S, B> {
    svc: S,
    req: Request<B>,
    miss: Miss,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn lookup(lookup: LookupFuture, svc: S, req: Request<B>, miss: Miss) -> Self {
        ResponseFuture {
            state: State::Lookup {
                lookup,
                pending: Some(Pending { svc, req, miss }),
            },
        }
    }

    pub(crate) fn inner(fut: S::Future, outcome: Outcome) -> Self {
        ResponseFuture {
            state: State::Inner {
                fut,
                outcome: Some(outcome),
            },
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Lookup { .. } => "Lookup",
            State::Inner { .. } => "Inner",
            State::Done => "Done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Output = Result<Response<FenceBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Lookup { lookup, pending } => {
                    let found = ready!(lookup.as_mut().poll(cx));
                    let Some(Pending { mut svc, req, miss }) = pending.take() else {
                        // Only reachable if polled again after completing.
                        state.set(State::Done);
                        continue;
                    };
                    match resolve(found, &req, miss) {
                        Resolved::Hit(hit) => {
                            state.set(State::Done);
                            return Poll::Ready(Ok(hit));
                        }
                        Resolved::Forward(outcome) => {
                            let fut = svc.call(req);
                            state.set(State::Inner {
                                fut,
                                outcome: Some(outcome),
                            });
                        }
                    }
                }
                StateProj::Inner { fut, outcome } => {
                    let result = ready!(fut.poll(cx));
                    let outcome = outcome.take();
                    state.set(State::Done);
                    return Poll::Ready(result.map(|response| match outcome {
                        Some(outcome) => finish(response, outcome),
                        None => {
                            let (parts, body) = response.into_parts();
                            Response::from_parts(parts, FenceBody::passthrough(body))
                        }
                    }));
                }
                // Polled after completion: the contract allows anything but
                // a panic is an outage; stay pending.
                StateProj::Done => return Poll::Pending,
            }
        }
    }
}
