//! [`FenceService`]: `poll_ready` delegates; `call` plans the request and
//! makes its future.

use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::FenceBody;
use crate::flow::plan::{self, Plan};
use crate::future::{Outcome, ResponseFuture, Telling};
use crate::shared::Shared;

/// Caches the responses of the inner service `S`; made by
/// [`FenceLayer`](crate::FenceLayer).
///
/// `GET` requests are looked up and, on a miss, their responses stored when
/// HTTP allows it; `HEAD` requests are answered from the `GET` entry. Every
/// other request goes to `S` untouched. Errors of `S` pass through as they
/// are: the cache adds none, and a store that fails or is slow sends the
/// request to `S` (fail open).
///
/// `S`, its future, its error and the bodies must be `Send + 'static`: a
/// rebuild runs in a task of its own (so that a client hanging up does not
/// cancel it for everyone waiting), and background refreshes call `S` after
/// the triggering response was sent. axum, tonic and hyper services are.
///
/// `S` is cloned only for a request that calls it: a hit answered in the
/// process leaves the service `poll_ready` readied in place, still ready
/// for the next call.
pub struct FenceService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> FenceService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        FenceService { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for FenceService<S> {
    fn clone(&self) -> Self {
        FenceService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for FenceService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceService")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for FenceService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<FenceBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let telling = telling(&self.shared, &parts);
        let keyed = match plan::plan(&self.shared, &parts) {
            Plan::Pass(status) => {
                let fut = self.inner.call(Request::from_parts(parts, body));
                return ResponseFuture::inner(fut, Outcome::Pass(self.shared.clone(), status))
                    .told(telling);
            }
            Plan::Write(write) => {
                let fut = self.inner.call(Request::from_parts(parts, body));
                return ResponseFuture::inner(fut, Outcome::Write(self.shared.clone(), write))
                    .told(telling);
            }
            Plan::Lookup(keyed) => keyed,
            Plan::ReadGrpc => {
                let clone = self.inner.clone();
                let svc = mem::replace(&mut self.inner, clone);
                return ResponseFuture::read_grpc(svc, parts, body, self.shared.clone())
                    .told(telling);
            }
        };
        // `poll_ready` readied `self.inner`: a request that needs it takes
        // that one and leaves a fresh clone behind (tower's clone-and-swap);
        // a hit the store answers at once never clones it. A missing entry
        // being rebuilt in this process is waited for in memory, without a
        // store round trip. A store that answers at once is read here,
        // inside the request's span (a refresh it starts carries the span).
        let inner = &mut self.inner;
        let take_inner = || {
            let clone = inner.clone();
            mem::replace(inner, clone)
        };
        let req = Request::from_parts(parts, body);
        crate::future::start_told(take_inner, req, keyed, telling)
    }
}

/// The request's span (`tower_fence`, at debug level: its `cache` field
/// gets the outcome, `route` the rule's pattern) and, when metrics or the
/// span need it, the route. Nothing is allocated when neither is on.
fn telling(shared: &Shared, parts: &http::request::Parts) -> Telling {
    let span = tracing::debug_span!(
        "tower_fence",
        method = %parts.method,
        route = tracing::field::Empty,
        cache = tracing::field::Empty,
    );
    let route = if cfg!(feature = "metrics") || !span.is_disabled() {
        plan::route_of(shared, parts)
    } else {
        None
    };
    if let Some(route) = &route {
        span.record("route", &**route);
    }
    Telling { span, route }
}
