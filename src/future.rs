//! The response future of [`FenceService`](crate::FenceService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::task::JoinHandle;
use tower_service::Service;

use crate::body::FenceBody;
use crate::entry::{flags, unix_ms, Entry};
use crate::flight::{Joined, Landing};
use crate::invalidate::{self, InvalidationMode};
use crate::key;
use crate::layer::Counters;
use crate::policy::{self, Usability};
use crate::rebuild::{self, Job, LeaderResult};
use crate::service::{
    entry_response, finish, lookup, vary_matches, Found, LookupFuture, Outcome, Pending,
};
use crate::status::{CacheStatus, Fwd};

/// How often a request joins a flight whose leader vanished before it goes
/// to the inner service itself.
const MAX_JOINS: u8 = 3;

type WaitFuture = Pin<Box<dyn Future<Output = Option<Landing>> + Send>>;

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
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, RB>
    where
        S: Service<Request<B>>,
        RB: Body,
    {
        Lookup {
            lookup: LookupFuture,
            pending: Option<Pending<S, B>>,
        },
        Waiting {
            wait: WaitFuture,
            pending: Option<Pending<S, B>>,
            stale: Option<Arc<Entry>>,
            fwd: Fwd,
            joins: u8,
        },
        Leading {
            handle: JoinHandle<LeaderResult<RB, S::Error>>,
        },
        Inner {
            #[pin]
            fut: S::Future,
            outcome: Option<Outcome>,
        },
        Invalidating {
            work: Pin<Box<dyn Future<Output = ()> + Send>>,
            response: Option<Response<FenceBody<RB>>>,
        },
        Done,
    }
}

impl<S, B, RB> ResponseFuture<S, B, RB>
where
    S: Service<Request<B>>,
    RB: Body,
{
    pub(crate) fn lookup(lookup: LookupFuture, pending: Pending<S, B>) -> Self {
        ResponseFuture {
            state: State::Lookup {
                lookup,
                pending: Some(pending),
            },
        }
    }

    /// A request that waits on a rebuild already running in this process.
    pub(crate) fn waiting(wait: crate::flight::Wait, pending: Pending<S, B>) -> Self {
        let timeout = pending.miss.shared.wait_timeout;
        ResponseFuture {
            state: State::Waiting {
                wait: Box::pin(wait.landing(timeout)),
                pending: Some(pending),
                stale: None,
                fwd: Fwd::UriMiss,
                joins: 1,
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

impl<S, B, RB> fmt::Debug for ResponseFuture<S, B, RB>
where
    S: Service<Request<B>>,
    RB: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Lookup { .. } => "Lookup",
            State::Waiting { .. } => "Waiting",
            State::Leading { .. } => "Leading",
            State::Inner { .. } => "Inner",
            State::Invalidating { .. } => "Invalidating",
            State::Done => "Done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// The next state, or a response to return now.
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
        let mut state = self.project().state;
        loop {
            let step = match state.as_mut().project() {
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
                    let landing = ready!(wait.as_mut().poll(cx));
                    match pending.take() {
                        Some(pending) => {
                            Step::after_wait(landing, pending, stale.take(), *fwd, *joins)
                        }
                        None => Step::Go(State::Done),
                    }
                }
                StateProj::Leading { handle } => {
                    let joined = ready!(Pin::new(handle).poll(cx));
                    state.set(State::Done);
                    return Poll::Ready(match joined {
                        Ok(result) => result,
                        // The inner service panicked in the rebuild task:
                        // panic here as it would have without the cache.
                        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                        Err(_) => Ok(unavailable()),
                    });
                }
                StateProj::Inner { fut, outcome } => {
                    let result = ready!(fut.poll(cx));
                    let outcome = outcome.take();
                    let response = match result {
                        Ok(response) => response,
                        Err(err) => {
                            state.set(State::Done);
                            return Poll::Ready(Err(err));
                        }
                    };
                    let invalidation = match &outcome {
                        Some(Outcome::Write {
                            shared,
                            uri,
                            host,
                            also,
                        }) => {
                            let mut targets = invalidate::targets_of_write(
                                shared,
                                uri,
                                host.as_deref(),
                                response.status(),
                                response.headers(),
                            );
                            if !targets.is_empty() {
                                for path in also {
                                    let target = invalidate::Target::Prefix(path.clone());
                                    if !targets.contains(&target) {
                                        targets.push(target);
                                    }
                                }
                            }
                            Some((shared.clone(), targets))
                        }
                        _ => None,
                    };
                    let response = match outcome {
                        Some(outcome) => finish(response, outcome),
                        None => {
                            let (parts, body) = response.into_parts();
                            Response::from_parts(parts, FenceBody::passthrough(body))
                        }
                    };
                    match invalidation {
                        Some((shared, targets)) if !targets.is_empty() => {
                            match shared.invalidation.mode {
                                InvalidationMode::Background => {
                                    for target in targets {
                                        invalidate::enqueue(&shared, target, 0);
                                    }
                                    Step::Respond(response)
                                }
                                _ => {
                                    // Read-your-writes: the response waits.
                                    Step::Go(State::Invalidating {
                                        work: Box::pin(invalidate::inline(shared, targets)),
                                        response: Some(response),
                                    })
                                }
                            }
                        }
                        _ => Step::Respond(response),
                    }
                }
                StateProj::Invalidating { work, response } => {
                    ready!(work.as_mut().poll(cx));
                    match response.take() {
                        Some(response) => Step::Respond(response),
                        None => Step::Go(State::Done),
                    }
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
}

/// The steps after a lookup or a wait. One `impl` so that the bounds a
/// detached rebuild needs are written once.
impl<S, B, RB> Step<S, B, RB>
where
    S: Service<Request<B>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Send,
{
    fn after_lookup(found: Found, pending: Pending<S, B>) -> Self {
        let Pending {
            mut svc,
            req,
            mut miss,
        } = pending;
        let shared = miss.shared.clone();
        let now_ms = unix_ms(SystemTime::now());
        let head = req.method() == Method::HEAD;
        let mut store_failure = None;
        let is_variant = miss.key != miss.base;
        let (fwd, stale) = match found {
            Found::Vary(names) if !is_variant => {
                // The URL's responses vary: look the request's variant up.
                miss.key = key::variant(&miss.base, &names, req.headers());
                let lookup = Box::pin(lookup(shared, miss.key.clone()));
                return Step::Go(State::Lookup {
                    lookup,
                    pending: Some(Pending { svc, req, miss }),
                });
            }
            Found::Vary(_) => (Fwd::VaryMiss, None),
            Found::Nothing if is_variant => (Fwd::VaryMiss, None),
            Found::Failed(err) => {
                // Fail open, but still one request per key in this process: a
                // store outage must not become an origin stampede.
                Counters::bump(&shared.counters.bypasses);
                store_failure = Some(err.detail());
                if head
                    || !miss.facts.may_store
                    || (miss.facts.authorized && !miss.overrides.keyed_by_credential)
                {
                    let fut = svc.call(req);
                    return Step::Go(State::Inner {
                        fut,
                        outcome: Some(Outcome::Pass(shared, CacheStatus::bypass(err.detail()))),
                    });
                }
                (Fwd::Bypass, None)
            }
            Found::Nothing => (Fwd::UriMiss, None),
            Found::Entry(entry) if !vary_matches(&entry, req.headers()) => (Fwd::VaryMiss, None),
            Found::Entry(entry) => {
                let keyed = miss.overrides.keyed_by_credential;
                match policy::usability(&entry, &miss.facts, keyed, now_ms) {
                    Usability::Fresh => {
                        Counters::bump(&shared.counters.hits);
                        let beta = shared.xfetch_beta;
                        let due =
                            beta > 0.0 && entry.xfetch_due(now_ms, beta, 1.0 - fastrand::f64());
                        let ttl = entry.ttl_ms(now_ms).div_euclid(1000);
                        let response = entry_response(
                            entry,
                            head,
                            CacheStatus::hit(ttl),
                            true,
                            Some(req.headers()),
                        );
                        if due {
                            Counters::bump(&shared.counters.early_refreshes);
                            Self::spawn_refresh(svc, req, miss, None);
                        }
                        return Step::Respond(response);
                    }
                    Usability::StaleAccepted => {
                        Counters::bump(&shared.counters.stale_hits);
                        let ttl = entry.ttl_ms(now_ms).div_euclid(1000);
                        let status = CacheStatus::stale(ttl, "max-stale");
                        return Step::Respond(entry_response(
                            entry,
                            head,
                            status,
                            true,
                            Some(req.headers()),
                        ));
                    }
                    Usability::NotShared => (Fwd::Request, None),
                    Usability::Validate => {
                        let expired = !entry.is_fresh(now_ms);
                        let grace = expired
                            && entry.in_grace(now_ms)
                            && !entry.has(flags::REVALIDATE)
                            && !miss.facts.no_cache
                            && miss.facts.max_age.is_none()
                            && miss.facts.min_fresh.is_none();
                        if grace {
                            // Stale-while-revalidate: serve what is here, refresh
                            // (revalidate) behind.
                            Counters::bump(&shared.counters.stale_hits);
                            let ttl = entry.ttl_ms(now_ms).div_euclid(1000);
                            let entry = Arc::new(entry);
                            let status = CacheStatus::stale(ttl, "stale-while-revalidate");
                            let response = entry_response(
                                Entry::clone(&entry),
                                head,
                                status,
                                true,
                                Some(req.headers()),
                            );
                            Self::spawn_refresh(svc, req, miss, Some(entry));
                            return Step::Respond(response);
                        }
                        let fwd = if expired { Fwd::Stale } else { Fwd::Request };
                        (fwd, Some(Arc::new(entry)))
                    }
                }
            }
        };
        if miss.facts.only_if_cached {
            // RFC 9111 §5.2.1.7: nothing usable is stored, and the client does
            // not want the origin asked.
            return Step::Respond(only_if_cached_miss());
        }
        if store_failure.is_none() {
            Counters::bump(&shared.counters.misses);
        }
        if head
            || !miss.facts.may_store
            || (miss.facts.authorized && !miss.overrides.keyed_by_credential)
            || shared.hit_for_miss.contains_key(miss.key.as_str())
        {
            // HEAD gets no body to store; `no-store` requests store nothing;
            // a request with credentials is not coalesced with others; keys
            // that were recently uncacheable skip the flight (hit-for-miss).
            let outcome = Outcome::fill(miss, fwd, &req);
            let fut = svc.call(req);
            return Step::Go(State::Inner {
                fut,
                outcome: Some(outcome),
            });
        }
        Self::join_flight(Pending { svc, req, miss }, stale, fwd, 1, store_failure)
    }

    fn after_wait(
        landing: Option<Landing>,
        pending: Pending<S, B>,
        stale: Option<Arc<Entry>>,
        fwd: Fwd,
        joins: u8,
    ) -> Self {
        let shared = pending.miss.shared.clone();
        match landing {
            Some(Landing::Response(entry)) if vary_matches(&entry, pending.req.headers()) => {
                Counters::bump(&shared.counters.collapsed);
                let status = CacheStatus::collapsed(fwd, entry.status.as_u16());
                let entry = Arc::try_unwrap(entry).unwrap_or_else(|shared| Entry::clone(&shared));
                Step::Respond(entry_response(
                    entry,
                    false,
                    status,
                    true,
                    Some(pending.req.headers()),
                ))
            }
            Some(Landing::Retry) if joins < MAX_JOINS => {
                Self::join_flight(pending, stale, fwd, joins + 1, None)
            }
            None => {
                let now_ms = unix_ms(SystemTime::now());
                Counters::bump(&shared.counters.wait_timeouts);
                match stale.filter(|s| s.in_grace(now_ms) || s.usable_on_error(now_ms)) {
                    Some(stale) => {
                        let ttl = stale.ttl_ms(now_ms).div_euclid(1000);
                        let entry =
                            Arc::try_unwrap(stale).unwrap_or_else(|shared| Entry::clone(&shared));
                        Step::Respond(entry_response(
                            entry,
                            false,
                            CacheStatus::stale(ttl, "wait-timeout"),
                            true,
                            Some(pending.req.headers()),
                        ))
                    }
                    None => Self::go_alone(pending, fwd),
                }
            }
            // The leader's answer is not for us (uncacheable, another variant),
            // or its leaders kept vanishing: ask the inner service ourselves.
            Some(_) => Self::go_alone(pending, fwd),
        }
    }

    /// Joins the key's flight: leads it (the rebuild runs in a task of its
    /// own) or waits for it.
    fn join_flight(
        pending: Pending<S, B>,
        stale: Option<Arc<Entry>>,
        fwd: Fwd,
        joins: u8,
        store_failure: Option<&'static str>,
    ) -> Self {
        let shared = pending.miss.shared.clone();
        match shared.flights.join(pending.miss.key.as_str()) {
            Joined::Waiter(wait) => Step::Go(State::Waiting {
                wait: Box::pin(wait.landing(shared.wait_timeout)),
                pending: Some(pending),
                stale,
                fwd,
                joins,
            }),
            Joined::Leader(lead) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    // No runtime to run a detached rebuild on: do it inline.
                    drop(lead);
                    return Self::go_alone(pending, fwd);
                };
                let Pending { svc, req, miss } = pending;
                let job = Job {
                    shared: miss.shared,
                    key: miss.key,
                    base: miss.base,
                    lead,
                    svc,
                    req,
                    stale,
                    fwd,
                    store_failure,
                    overrides: miss.overrides,
                    authorized: miss.facts.authorized,
                };
                Step::Go(State::Leading {
                    handle: runtime.spawn(rebuild::lead_miss(job)),
                })
            }
        }
    }

    /// Sends the request to the inner service without the flight.
    fn go_alone(pending: Pending<S, B>, fwd: Fwd) -> Self {
        let Pending { mut svc, req, miss } = pending;
        let outcome = Outcome::fill(miss, fwd, &req);
        let fut = svc.call(req);
        Step::Go(State::Inner {
            fut,
            outcome: Some(outcome),
        })
    }

    /// Starts a background refresh of the key, unless one runs in this process.
    fn spawn_refresh(
        svc: S,
        req: Request<B>,
        miss: crate::service::Miss,
        current: Option<Arc<Entry>>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(lead) = miss.shared.flights.try_lead(miss.key.as_str()) else {
            return;
        };
        let job = Job {
            shared: miss.shared,
            key: miss.key,
            base: miss.base,
            lead,
            svc,
            req,
            stale: current,
            fwd: Fwd::Stale,
            store_failure: None,
            overrides: miss.overrides,
            authorized: miss.facts.authorized,
        };
        runtime.spawn(rebuild::refresh(job));
    }
}

/// The answer to `only-if-cached` when nothing usable is stored.
fn only_if_cached_miss<RB: Body>() -> Response<FenceBody<RB>> {
    let mut response = Response::new(FenceBody::cached(Bytes::new(), None));
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    CacheStatus {
        detail: Some("only-if-cached"),
        ..CacheStatus::default()
    }
    .append_to(response.headers_mut());
    response
}

/// The answer when a rebuild task was cancelled (the runtime shuts down).
fn unavailable<RB: Body>() -> Response<FenceBody<RB>> {
    let mut response = Response::new(FenceBody::cached(
        Bytes::from_static(b"rebuild cancelled\n"),
        None,
    ));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    CacheStatus::bypass("rebuild-cancelled").append_to(response.headers_mut());
    response
}
