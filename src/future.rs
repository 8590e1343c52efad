//! The response future of [`FenceService`](crate::FenceService): the only
//! place that holds and advances a request's state. Each step asks a
//! function of [`flow`](crate::flow) what to do next.
//!
//! ```text
//! ReadGrpc ─┬─ Lookup / Waiting (a gRPC call a rule caches, its message read)
//!           └─ Inner (pass: not one message in time, or no rule now)
//! Lookup ─┬─ Serve ───────────────────────────────► Done
//!         ├─ Lookup (the variant)
//!         ├─ Waiting ─┬─ Serve / 502 ─────────────► Done
//!         │           ├─ Waiting / Leading (join again, take over)
//!         │           └─ Permit ─► Inner (alone)
//!         ├─ Leading (the rebuild runs in a task) ─► Done
//!         └─ Permit ─► Inner (alone, recorded) ────► Done
//! Inner (pass) ───────────────────────────────────► Done
//! Inner (write) ─► Invalidating ──────────────────► Done
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{header, HeaderMap, Method, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::{FenceBody, Recorder};
use crate::entry::Entry;
use crate::flow::hit::{self, Miss, Verdict};
use crate::flow::lead::{self, Job, Leading};
use crate::flow::lookup::{lookup, lookup_now};
use crate::flow::plan::{self, Plan, Write};
use crate::flow::settle::{self, Fence};
use crate::flow::wait::{self, AfterWait};
use crate::flow::{refresh, Inner, Keyed, SendBody};
use crate::grpc;
use crate::invalidate::{self, InvalidationMode};
use crate::policy;
use crate::respond::{self, vary_values};
use crate::shared::{Landing, Shared};
use crate::singleflight::{Role, Wait, Waited};
use crate::status::{CacheOutcome, CacheStatus, Fwd, Served};
use crate::store_client::Found;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The readied inner service and the request, held while the cache is
/// consulted.
pub(crate) struct Pending<S, B> {
    pub(crate) svc: S,
    pub(crate) req: Request<B>,
    pub(crate) keyed: Keyed,
}

pin_project! {
    /// Response future of [`FenceService`](crate::FenceService): a store
    /// lookup, then a cached response, the answer of the request that
    /// rebuilds the entry, or the inner service's own.
    pub struct ResponseFuture<S, B, RB>
    where
        S: Service<Request<B>>,
        RB: Body,
    {
        #[pin]
        state: State<S, B, RB>,
        telling: Telling,
    }
}

/// What a response is told to when it is ready: the request's span (its
/// `cache` field gets the outcome) and, for metrics, the route rule's
/// pattern.
#[derive(Debug)]
pub(crate) struct Telling {
    pub(crate) span: tracing::Span,
    pub(crate) route: Option<Arc<str>>,
}

impl Default for Telling {
    fn default() -> Self {
        Telling {
            span: tracing::Span::none(),
            route: None,
        }
    }
}

impl Telling {
    /// Records what the cache did for `response`.
    fn tell<B>(&self, response: &Response<B>) {
        // Nothing to tell without metrics and with no span enabled.
        if !cfg!(feature = "metrics") && self.span.is_disabled() {
            return;
        }
        let Some(outcome) = response.extensions().get::<CacheOutcome>() else {
            return;
        };
        let served = outcome.served();
        self.span.record("cache", served.as_str());
        let reason = (served == Served::Bypass)
            .then(|| outcome.detail())
            .flatten();
        crate::metrics::request(served.as_str(), reason, self.route.as_deref().unwrap_or(""));
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, RB>
    where
        S: Service<Request<B>>,
        RB: Body,
    {
        ReadGrpc {
            read: BoxFuture<grpc::Read<B>>,
            svc: Option<S>,
            parts: Option<http::request::Parts>,
            shared: Arc<Shared>,
        },
        Lookup {
            lookup: BoxFuture<Found>,
            pending: Option<Pending<S, B>>,
        },
        Waiting {
            wait: BoxFuture<Waited<Landing>>,
            pending: Option<Pending<S, B>>,
            stale: Option<Arc<Entry>>,
            fwd: Fwd,
            joins: u8,
        },
        Leading {
            leading: Leading<RB, S::Error>,
        },
        Permit {
            permit: BoxFuture<(Fence, Instant)>,
            pending: Option<Pending<S, B>>,
            fwd: Fwd,
        },
        Inner {
            #[pin]
            fut: S::Future,
            outcome: Option<Outcome>,
        },
        Invalidating {
            work: BoxFuture<()>,
            shared: Arc<Shared>,
            response: Option<Response<FenceBody<RB>>>,
        },
        /// Answered when the future was made (a store that answers at
        /// once, see [`Store::get_now`](crate::store::Store::get_now)).
        Ready {
            response: Option<Response<FenceBody<RB>>>,
        },
        Done,
    }
}

/// What to do with the inner service's response.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outcome {
    /// Pass it through, saying this in `Cache-Status`.
    Pass(Arc<Shared>, CacheStatus),
    /// A write: pass it through, then invalidate what it touched.
    Write(Arc<Shared>, Write),
    /// A request that went to the origin without the flight: record and
    /// store the response if it may be, fenced by its permit.
    Alone {
        keyed: Keyed,
        fwd: Fwd,
        fence: Fence,
        request_headers: HeaderMap,
        path: String,
        started: Instant,
    },
}

impl<S, B, RB> ResponseFuture<S, B, RB>
where
    S: Service<Request<B>>,
    RB: Body,
{
    /// A gRPC call a rule caches: its request message is read first.
    pub(crate) fn read_grpc(
        svc: S,
        parts: http::request::Parts,
        body: B,
        shared: Arc<Shared>,
    ) -> Self
    where
        B: Send + 'static,
    {
        let read = Box::pin(grpc::read_request(
            body,
            shared.grpc_max_request,
            shared.grpc_read_timeout,
        ));
        ResponseFuture {
            state: State::ReadGrpc {
                read,
                svc: Some(svc),
                parts: Some(parts),
                shared,
            },
            telling: Telling::default(),
        }
    }

    /// A request whose key is read from a store that needs a round trip
    /// (see [`Step::lookup`]).
    fn lookup_later(pending: Pending<S, B>) -> Self {
        let lookup = Box::pin(lookup(
            pending.keyed.shared.clone(),
            pending.keyed.key.clone(),
            pending.keyed.epoch,
        ));
        ResponseFuture {
            state: State::Lookup {
                lookup,
                pending: Some(pending),
            },
            telling: Telling::default(),
        }
    }

    /// A request that waits on a rebuild already running in this process.
    pub(crate) fn waiting(wait: Wait<Landing>, mut pending: Pending<S, B>) -> Self {
        crate::vary::normalise_request(pending.req.headers_mut());
        ResponseFuture {
            state: waiting(wait, pending, None, Fwd::UriMiss, 1),
            telling: Telling::default(),
        }
    }

    pub(crate) fn inner(fut: S::Future, outcome: Outcome) -> Self {
        ResponseFuture {
            state: State::Inner {
                fut,
                outcome: Some(outcome),
            },
            telling: Telling::default(),
        }
    }

    /// The response will be told to `telling`.
    pub(crate) fn told(mut self, telling: Telling) -> Self {
        self.telling = telling;
        self
    }
}

/// The response future of a request the cache may answer, told to
/// `telling` (its span is entered while the store is read: a refresh it
/// starts carries it). See [`start`].
pub(crate) fn start_told<S, B, RB>(
    inner: impl FnOnce() -> S,
    req: Request<B>,
    keyed: Keyed,
    telling: Telling,
) -> ResponseFuture<S, B, RB>
where
    S: Inner<B, RB>,
    B: Send + 'static,
    RB: SendBody,
{
    let state = telling.span.in_scope(|| start(inner, req, keyed));
    ResponseFuture { state, telling }
}

/// The first state of a request the cache may answer: it waits on a
/// rebuild already running in this process, or looks its key up (and is
/// answered already when the store could answer at once). `inner` gives
/// the readied inner service; a hit the store answered at once never asks
/// for it.
fn start<S, B, RB>(inner: impl FnOnce() -> S, req: Request<B>, keyed: Keyed) -> State<S, B, RB>
where
    S: Inner<B, RB>,
    B: Send + 'static,
    RB: SendBody,
{
    let may_join = (req.method() == Method::GET || is_grpc_lookup(&req))
        && keyed.may_share()
        && !keyed.facts.only_if_cached
        && !keyed.facts.no_cache;
    let join = may_join
        .then(|| {
            keyed
                .shared
                .flights
                .join_running(keyed.key.as_str(), keyed.epoch)
        })
        .flatten();
    if let Some(wait) = join {
        keyed.shared.bump(|c| &c.misses);
        let svc = inner();
        return ResponseFuture::waiting(wait, Pending { svc, req, keyed }).state;
    }
    match Step::lookup(inner, req, keyed) {
        Step::Respond(response) => State::Ready {
            response: Some(response),
        },
        Step::Go(state) => state,
    }
}

fn waiting<S, B, RB>(
    wait: Wait<Landing>,
    pending: Pending<S, B>,
    stale: Option<Arc<Entry>>,
    fwd: Fwd,
    joins: u8,
) -> State<S, B, RB>
where
    S: Service<Request<B>>,
    RB: Body,
{
    let timeout = Some(pending.keyed.shared.wait_timeout);
    State::Waiting {
        wait: Box::pin(wait.landing(timeout)),
        pending: Some(pending),
        stale,
        fwd,
        joins,
    }
}

impl<S, B, RB> fmt::Debug for ResponseFuture<S, B, RB>
where
    S: Service<Request<B>>,
    RB: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::ReadGrpc { .. } => "ReadGrpc",
            State::Lookup { .. } => "Lookup",
            State::Waiting { .. } => "Waiting",
            State::Leading { .. } => "Leading",
            State::Permit { .. } => "Permit",
            State::Inner { .. } => "Inner",
            State::Invalidating { .. } => "Invalidating",
            State::Ready { .. } => "Ready",
            State::Done => "Done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// The next state, or a response to return now. Moved once per step, so
/// the size difference between variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Step<S, B, RB>
where
    S: Service<Request<B>>,
    RB: Body,
{
    Respond(Response<FenceBody<RB>>),
    Go(State<S, B, RB>),
}

impl<S, B, RB> Future for ResponseFuture<S, B, RB>
where
    S: Service<Request<B>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Send,
{
    type Output = Result<Response<FenceBody<RB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Work spawned while polling (a rebuild, a refresh, an
        // invalidation) carries this span.
        let _entered = this.telling.span.enter();
        let output = ready!(poll_state(this.state, cx));
        if let Ok(response) = &output {
            this.telling.tell(response);
        }
        Poll::Ready(output)
    }
}

/// Advances the response future's state until it has an answer.
#[allow(clippy::type_complexity)]
fn poll_state<S, B, RB>(
    mut state: Pin<&mut State<S, B, RB>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<FenceBody<RB>>, S::Error>>
where
    S: Inner<B, RB>,
    B: Send + 'static,
    RB: SendBody,
{
    loop {
        let step = match state.as_mut().project() {
            StateProj::ReadGrpc {
                read,
                svc,
                parts,
                shared,
            } => {
                let read = ready!(read.as_mut().poll(cx));
                match (svc.take(), parts.take()) {
                    (Some(svc), Some(parts)) => after_read(svc, parts, read, shared),
                    _ => Step::Go(State::Done),
                }
            }
            StateProj::Lookup { lookup, pending } => {
                let found = ready!(lookup.as_mut().poll(cx));
                match pending.take() {
                    Some(pending) => Step::after_lookup(found, pending),
                    // Only reachable if polled again after completing.
                    None => Step::Go(State::Done),
                }
            }
            StateProj::Waiting {
                wait,
                pending,
                stale,
                fwd,
                joins,
            } => {
                let waited = ready!(wait.as_mut().poll(cx));
                match pending.take() {
                    Some(pending) => Step::after_wait(waited, pending, stale.take(), *fwd, *joins),
                    None => Step::Go(State::Done),
                }
            }
            StateProj::Leading { leading } => {
                let result = match ready!(Pin::new(&mut leading.reply).poll(cx)) {
                    Ok(result) => result,
                    Err(_) => match ready!(Pin::new(&mut leading.task).poll(cx)) {
                        // The inner service panicked in the rebuild
                        // task: panic here as it would have without
                        // the cache.
                        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                        _ => Ok(respond::unavailable()),
                    },
                };
                state.set(State::Done);
                return Poll::Ready(result);
            }
            StateProj::Permit {
                permit,
                pending,
                fwd,
            } => {
                let (fence, started) = ready!(permit.as_mut().poll(cx));
                match pending.take() {
                    Some(Pending {
                        mut svc,
                        req,
                        keyed,
                    }) => {
                        let outcome = Outcome::Alone {
                            fwd: *fwd,
                            fence,
                            request_headers: req.headers().clone(),
                            path: req.uri().path().to_owned(),
                            started,
                            keyed,
                        };
                        let fut = svc.call(req);
                        Step::Go(State::Inner {
                            fut,
                            outcome: Some(outcome),
                        })
                    }
                    None => Step::Go(State::Done),
                }
            }
            StateProj::Inner { fut, outcome } => {
                let response = match ready!(fut.poll(cx)) {
                    Ok(response) => response,
                    Err(err) => {
                        state.set(State::Done);
                        return Poll::Ready(Err(err));
                    }
                };
                match outcome.take() {
                    Some(Outcome::Write(shared, write)) => after_write(shared, write, response),
                    Some(outcome) => Step::Respond(finish(response, outcome)),
                    None => Step::Go(State::Done),
                }
            }
            StateProj::Invalidating {
                work,
                shared,
                response,
            } => {
                ready!(work.as_mut().poll(cx));
                // From now on no request joins a flight or read that
                // may have seen data from before this write.
                shared.write_done();
                match response.take() {
                    Some(response) => Step::Respond(response),
                    None => Step::Go(State::Done),
                }
            }
            StateProj::Ready { response } => {
                let response = response.take();
                state.set(State::Done);
                return match response {
                    Some(response) => Poll::Ready(Ok(response)),
                    None => Poll::Pending,
                };
            }
            // Polled after completion: the contract allows anything but
            // a panic is an outage; stay pending.
            StateProj::Done => return Poll::Pending,
        };
        match step {
            Step::Respond(response) => {
                state.set(State::Done);
                return Poll::Ready(Ok(response));
            }
            Step::Go(next) => state.set(next),
        }
    }
}

/// A gRPC call a rule caches, once its body was read: looked up under a key
/// that holds its message, or passed as it came.
fn after_read<S, B, RB>(
    mut svc: S,
    parts: http::request::Parts,
    read: grpc::Read<B>,
    shared: &Arc<Shared>,
) -> Step<S, B, RB>
where
    S: Inner<B, RB>,
    B: Send + 'static,
    RB: SendBody,
{
    let (keyed, req) = match read {
        grpc::Read::Message { message, body } => {
            match plan::plan_grpc(shared, &parts, &message) {
                Plan::Lookup(keyed) => (keyed, Request::from_parts(parts, body)),
                Plan::Pass(status) => {
                    let fut = svc.call(Request::from_parts(parts, body));
                    let outcome = Outcome::Pass(shared.clone(), status);
                    return Step::Go(State::Inner {
                        fut,
                        outcome: Some(outcome),
                    });
                }
                // `plan_grpc` neither writes nor reads again.
                Plan::Write(_) | Plan::ReadGrpc => {
                    let fut = svc.call(Request::from_parts(parts, body));
                    let outcome = Outcome::Pass(shared.clone(), CacheStatus::bypass("method"));
                    return Step::Go(State::Inner {
                        fut,
                        outcome: Some(outcome),
                    });
                }
            }
        }
        grpc::Read::Pass { body, detail } => {
            shared.bump(|c| &c.bypasses);
            let fut = svc.call(Request::from_parts(parts, body));
            let outcome = Outcome::Pass(shared.clone(), CacheStatus::bypass(detail));
            return Step::Go(State::Inner {
                fut,
                outcome: Some(outcome),
            });
        }
    };
    Step::Go(start(|| svc, req, keyed))
}

/// The response of a stored entry the lookup found usable.
fn serve<B, RB: Body>(
    entry: Entry,
    status: CacheStatus,
    now_ms: u64,
    req: &Request<B>,
) -> Response<FenceBody<RB>> {
    let head = req.method() == Method::HEAD;
    respond::entry_response(entry, now_ms, head, status, true, Some(req.headers()))
}

/// Whether a request in a lookup is a gRPC call (a `POST` only ever is,
/// planned by [`plan::plan_grpc`]).
pub(crate) fn is_grpc_lookup<B>(req: &Request<B>) -> bool {
    req.method() == Method::POST && grpc::is_grpc(req.headers())
}

/// A write's response: invalidate what it touched, inline (the response
/// waits, within the invalidation budget) or in the background.
fn after_write<S, B, RB>(
    shared: Arc<Shared>,
    write: Write,
    response: Response<RB>,
) -> Step<S, B, RB>
where
    S: Service<Request<B>>,
    RB: Body,
{
    // A gRPC call failed when its (trailers-only) head says so; else its
    // outcome is in trailers still to come, and invalidating then is the
    // safe side (at worst one more miss).
    let mut targets = if write.grpc && grpc::head_failed(response.headers()) {
        Vec::new()
    } else {
        invalidate::targets_of_write(
            &shared,
            &write.uri,
            write.host.as_deref(),
            response.status(),
            response.headers(),
        )
    };
    if !targets.is_empty() {
        let also = write.also.into_iter().map(invalidate::Target::Prefix);
        let tags = write.tags.into_iter().map(invalidate::Target::Tag);
        for target in also.chain(tags) {
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
    }
    let response = finish(
        response,
        Outcome::Pass(shared.clone(), CacheStatus::bypass("method")),
    );
    if targets.is_empty() {
        return Step::Respond(response);
    }
    match shared.invalidation.mode {
        InvalidationMode::Background => {
            for target in targets {
                let job = invalidate::Job::of_write(&shared.invalidation, target);
                invalidate::enqueue(&shared, job);
            }
            shared.write_done();
            Step::Respond(response)
        }
        _ => Step::Go(State::Invalidating {
            work: Box::pin(invalidate::inline(shared.clone(), targets)),
            shared,
            response: Some(response),
        }),
    }
}

/// The steps after a lookup or a wait. One `impl` so that the bounds a
/// detached rebuild needs are written once.
impl<S, B, RB> Step<S, B, RB>
where
    S: Inner<B, RB>,
    B: Send + 'static,
    RB: SendBody,
{
    /// Looks the request's key up: at once when the store can answer
    /// without waiting (then this is what the answer leads to), else in a
    /// lookup state. `inner` gives the inner service; a fresh hit the store
    /// answers at once, on the URL's key or on its variant's, is served
    /// without asking for it.
    fn lookup(inner: impl FnOnce() -> S, req: Request<B>, mut keyed: Keyed) -> Self {
        let mut variant_looked_up = false;
        loop {
            let Some(found) = lookup_now(&keyed.shared, &keyed.key) else {
                let svc = inner();
                return Step::Go(ResponseFuture::lookup_later(Pending { svc, req, keyed }).state);
            };
            let now_ms = keyed.shared.clock.now_ms();
            match hit::after_lookup(found, &keyed, req.headers(), now_ms) {
                Verdict::Serve {
                    entry,
                    status,
                    refresh: false,
                } => return Step::Respond(serve(entry, status, now_ms, &req)),
                // Once: a variant's lookup finds an entry or a miss.
                Verdict::Variant(key) if !variant_looked_up => {
                    keyed.key = key;
                    variant_looked_up = true;
                }
                verdict => {
                    let svc = inner();
                    return Self::after_verdict(verdict, Pending { svc, req, keyed }, now_ms);
                }
            }
        }
    }

    fn after_lookup(found: Found, pending: Pending<S, B>) -> Self {
        let now_ms = pending.keyed.shared.clock.now_ms();
        let verdict = hit::after_lookup(found, &pending.keyed, pending.req.headers(), now_ms);
        Self::after_verdict(verdict, pending, now_ms)
    }

    fn after_verdict(verdict: Verdict, pending: Pending<S, B>, now_ms: u64) -> Self {
        let Pending {
            mut svc,
            mut req,
            mut keyed,
        } = pending;
        let answered_here = matches!(
            verdict,
            Verdict::Serve { refresh: false, .. } | Verdict::Variant(_) | Verdict::OnlyIfCached
        );
        if !answered_here {
            // The request goes to the origin (or a refresh): the origin
            // chooses for the variant the request is keyed under.
            crate::vary::normalise_request(req.headers_mut());
        }
        match verdict {
            Verdict::Serve {
                entry,
                status,
                refresh,
            } => {
                // A refresh needs the entry too (to revalidate it, and to
                // serve it if the origin fails): copy it only then.
                let current = refresh.then(|| Arc::new(entry.clone()));
                let response = serve(entry, status, now_ms, &req);
                if let Some(current) = current {
                    refresh::spawn(svc, req, keyed, current);
                }
                Step::Respond(response)
            }
            Verdict::Variant(key) => {
                keyed.key = key;
                Self::lookup(|| svc, req, keyed)
            }
            Verdict::OnlyIfCached => Step::Respond(respond::only_if_cached_miss()),
            Verdict::Pass(status) => {
                let fut = svc.call(req);
                Step::Go(State::Inner {
                    fut,
                    outcome: Some(Outcome::Pass(keyed.shared, status)),
                })
            }
            Verdict::Miss(miss) => {
                let alone = req.method() == Method::HEAD
                    || !keyed.may_share()
                    || keyed.shared.hit_for_miss.contains_key(keyed.key.as_str());
                let pending = Pending { svc, req, keyed };
                if alone {
                    // HEAD gets no body to store; a personal request is not
                    // coalesced with others; keys that were recently
                    // uncacheable skip the flight (hit-for-miss).
                    return Self::alone(pending, miss.fwd, miss.store_failure.is_none());
                }
                Self::join_flight(pending, miss, 1)
            }
        }
    }

    fn after_wait(
        waited: Waited<Landing>,
        pending: Pending<S, B>,
        stale: Option<Arc<Entry>>,
        fwd: Fwd,
        joins: u8,
    ) -> Self {
        let shared = pending.keyed.shared.clone();
        let now_ms = shared.clock.now_ms();
        let headers = pending.req.headers();
        let miss = |stale| Miss {
            fwd,
            stale,
            store_failure: None,
        };
        match wait::after_wait(&shared, waited, headers, stale.as_ref(), fwd, joins, now_ms) {
            AfterWait::Serve { entry, status } => Step::Respond(respond::shared_entry_response(
                entry,
                now_ms,
                false,
                status,
                true,
                Some(headers),
            )),
            AfterWait::Failed(status) => Step::Respond(respond::origin_failed(status)),
            AfterWait::Rejoin => Self::join_flight(pending, miss(stale), joins + 1),
            AfterWait::TakeOver(gave_up) => {
                let key = pending.keyed.key.shared();
                let role = shared
                    .flights
                    .take_over(&key, pending.keyed.epoch, &gave_up);
                Self::take_role(role, pending, miss(stale), joins + 1, true)
            }
            AfterWait::Alone => Self::alone(pending, fwd, true),
        }
    }

    /// Joins the key's flight: leads it (the rebuild runs in a task of its
    /// own) or waits for it.
    fn join_flight(pending: Pending<S, B>, miss: Miss, joins: u8) -> Self {
        let shared = pending.keyed.shared.clone();
        let role = shared
            .flights
            .join(&pending.keyed.key.shared(), pending.keyed.epoch);
        Self::take_role(role, pending, miss, joins, false)
    }

    fn take_role(
        role: Role<Landing>,
        pending: Pending<S, B>,
        miss: Miss,
        joins: u8,
        relief: bool,
    ) -> Self {
        match role {
            Role::Waiter(wait) => Step::Go(waiting(wait, pending, miss.stale, miss.fwd, joins)),
            Role::Full => Self::alone(pending, miss.fwd, miss.store_failure.is_none()),
            Role::Leader(lead) => {
                let Pending { svc, req, keyed } = pending;
                let job = Job {
                    keyed,
                    lead,
                    svc,
                    req,
                    stale: miss.stale,
                    fwd: miss.fwd,
                    store_failure: miss.store_failure,
                    relief,
                };
                match lead::spawn(job) {
                    Ok(leading) => Step::Go(State::Leading { leading }),
                    // No runtime to run a detached rebuild on: go alone.
                    Err(job) => {
                        drop(job.lead);
                        let pending = Pending {
                            svc: job.svc,
                            req: job.req,
                            keyed: job.keyed,
                        };
                        Self::alone(pending, job.fwd, false)
                    }
                }
            }
        }
    }

    /// Sends the request to the inner service without the flight; its
    /// response is stored only under a permit taken first (`store`).
    fn alone(pending: Pending<S, B>, fwd: Fwd, store: bool) -> Self {
        let may_store = store
            && (pending.req.method() == Method::GET || is_grpc_lookup(&pending.req))
            && pending.keyed.facts.may_store
            && tokio::runtime::Handle::try_current().is_ok();
        if !may_store {
            let Pending {
                mut svc,
                req,
                keyed,
            } = pending;
            let outcome = Outcome::Alone {
                fwd,
                fence: Fence::None,
                request_headers: HeaderMap::new(),
                path: String::new(),
                started: Instant::now(),
                keyed,
            };
            let fut = svc.call(req);
            return Step::Go(State::Inner {
                fut,
                outcome: Some(outcome),
            });
        }
        let shared = pending.keyed.shared.clone();
        let key = pending.keyed.key.clone();
        let lease_sets = invalidate::lease_sets(&shared, pending.req.uri().path());
        let permit = Box::pin(async move {
            let fence = settle::take_permit(&shared, &key, &lease_sets).await;
            (fence, Instant::now())
        });
        Step::Go(State::Permit {
            permit,
            pending: Some(pending),
            fwd,
        })
    }
}

/// Wraps the inner service's response: records it for the store when it may
/// be stored, and says what happened in `Cache-Status`.
pub(crate) fn finish<B>(response: Response<B>, outcome: Outcome) -> Response<FenceBody<B>>
where
    B: Body,
{
    let (mut parts, body) = response.into_parts();
    let (status, body) = match outcome {
        Outcome::Pass(shared, status) => {
            invalidate::strip_tags(&shared, &mut parts.headers);
            (status, FenceBody::passthrough(body))
        }
        Outcome::Write(shared, _) => {
            invalidate::strip_tags(&shared, &mut parts.headers);
            (CacheStatus::bypass("method"), FenceBody::passthrough(body))
        }
        Outcome::Alone {
            keyed,
            fwd,
            fence,
            request_headers,
            path,
            started,
        } => {
            let shared = keyed.shared.clone();
            let mut status = CacheStatus {
                fwd_status: Some(parts.status.as_u16()),
                ..CacheStatus::forward(fwd)
            };
            if !fence.allows_store() {
                invalidate::strip_tags(&shared, &mut parts.headers);
                if !keyed.facts.may_store {
                    status.detail = Some("request-no-store");
                }
                status.stamp_parts(&mut parts);
                return Response::from_parts(parts, FenceBody::passthrough(body));
            }
            let tags = invalidate::tags(&shared, &parts.headers);
            invalidate::strip_tags(&shared, &mut parts.headers);
            if keyed.overrides.strip_set_cookie {
                parts.headers.remove(header::SET_COOKIE);
            }
            let verdict = policy::storability(
                &shared.policy,
                &keyed.overrides,
                parts.status,
                &parts.headers,
                &keyed.facts,
                shared.clock.now(),
            );
            let body = match verdict {
                Err(reason) => {
                    status.detail = Some(reason);
                    settle_release(&shared, &keyed, fence);
                    FenceBody::passthrough(body)
                }
                Ok(_) if body.size_hint().lower() > shared.max_body_size as u64 => {
                    status.detail = Some("too-large");
                    settle_release(&shared, &keyed, fence);
                    FenceBody::passthrough(body)
                }
                Ok(freshness) => {
                    let names = policy::vary_names(&parts.headers).unwrap_or_default();
                    status.stored = body
                        .size_hint()
                        .upper()
                        .is_some_and(|upper| upper <= shared.max_body_size as u64);
                    let sets = invalidate::fill_sets(&shared, &path, &tags, &keyed.overrides.tags);
                    let vary = vary_values(&names, &request_headers);
                    let head_status = parts.status;
                    let headers = policy::storable_headers(&parts.headers);
                    let recorder = Recorder::new(shared.max_body_size, move |recorded| {
                        let entry = Entry::new(
                            head_status,
                            headers,
                            recorded.body,
                            recorded.trailers,
                            &freshness,
                            started,
                            vary,
                        );
                        settle::fill_behind(
                            shared,
                            keyed.base,
                            keyed.key,
                            entry,
                            fence,
                            sets,
                            keyed.overrides.declared_vary,
                        );
                    });
                    FenceBody::recording(body, recorder)
                }
            };
            (status, body)
        }
    };
    status.stamp_parts(&mut parts);
    Response::from_parts(parts, body)
}

/// Gives a permit back in the background (its request stores nothing).
fn settle_release(shared: &Arc<Shared>, keyed: &Keyed, fence: Fence) {
    if !fence.allows_store() {
        return;
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let shared = shared.clone();
        let key = keyed.key.clone();
        handle.spawn(async move { settle::release(&shared, &key, &fence).await });
    }
}
