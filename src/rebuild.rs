//! Rebuilding an entry: what a flight's leader does, in a task of its own.
//!
//! A rebuild runs detached from the request that started it, so that a
//! client that hangs up does not take its waiters' answer with it. It takes
//! the key's lease (one rebuild in the whole fleet), re-reads the store,
//! calls the inner service, reads the body up to the size cap, stores the
//! entry fenced by the lease, and lands the flight. When another process
//! holds the lease it waits for that process's fill instead, woken by the
//! store's fill notifications, polling as a fallback, up to `wait_timeout`.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes};
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tower_service::Service;

use crate::body::FenceBody;
use crate::entry::{concat, unix_ms, Entry, Record};
use crate::flight::{Landing, Lead};
use crate::invalidate;
use crate::key;
use crate::key::CacheKey;
use crate::layer::{Counters, Shared};
use crate::policy;
use crate::policy::{Freshness, Overrides, RequestFacts};
use crate::service::{entry_response, vary_matches, vary_values, with_timeout};
use crate::status::{CacheStatus, Fwd};
use crate::store::Fill as StoreFill;
use crate::validation;

/// A rebuild to run: the flight it leads, the readied inner service and the
/// request it sends there.
pub(crate) struct Job<S, B> {
    pub(crate) shared: Arc<Shared>,
    /// The key led and filled (the URL's or a variant's).
    pub(crate) key: CacheKey,
    /// The URL's key.
    pub(crate) base: CacheKey,
    pub(crate) lead: Lead,
    pub(crate) svc: S,
    pub(crate) req: Request<B>,
    /// The entry the lookup found, if stale: served when the origin fails
    /// (stale-if-error) or a remote rebuild takes too long.
    pub(crate) stale: Option<Arc<Entry>>,
    pub(crate) fwd: Fwd,
    /// Set when the lookup failed (the store is down or slow): the rebuild
    /// makes no store call, and says why in `Cache-Status`.
    pub(crate) store_failure: Option<&'static str>,
    /// The route's settings.
    pub(crate) overrides: Overrides,
    /// The request carries `Authorization` (whether it carries `Cookie` or a
    /// credential header is read from `req`: see [`credentials`]).
    pub(crate) authorized: bool,
}

/// What a rebuild needs to know of the request's credentials: `authorized`
/// as the job says, `cookie` read from the client's headers.
fn credentials(shared: &Shared, authorized: bool, request_headers: &HeaderMap) -> RequestFacts {
    RequestFacts {
        authorized,
        cookie: policy::carries_cookie(&shared.policy, request_headers),
        ..RequestFacts::default()
    }
}

/// What the leader's own client gets.
pub(crate) type LeaderResult<RB, E> = Result<Response<FenceBody<RB>>, E>;

/// Who may store the rebuilt entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// This rebuild holds the lease: store fenced by it.
    Held,
    /// The store could not be asked: store without a fence.
    Unknown,
    /// Another process holds it still, or the store is failing: do not
    /// store.
    Elsewhere,
}

/// A fresh random lease token.
fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// Leads the rebuild of a missing (or expired) entry; returns the response
/// for the leader's own client.
pub(crate) async fn lead_miss<S, B, RB>(job: Job<S, B>) -> LeaderResult<RB, S::Error>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body,
{
    let Job {
        shared,
        key,
        base,
        lead,
        svc,
        mut req,
        stale,
        fwd,
        store_failure,
        overrides,
        authorized,
    } = job;
    let Prepared {
        request_headers,
        path,
        lease_sets,
        token,
    } = prepare(&shared, &mut req);
    let facts = credentials(&shared, authorized, &request_headers);
    let keyed = overrides.keyed_by_credential;

    let lease = if store_failure.is_some() {
        Lease::Elsewhere
    } else {
        match take_lease(&shared, &key, &token, &lease_sets).await {
            Ok(true) => Lease::Held,
            Ok(false) => {
                match wait_for_remote_fill(
                    &shared,
                    &lead,
                    &key,
                    &token,
                    &lease_sets,
                    &request_headers,
                    (&facts, keyed),
                )
                .await
                {
                    Remote::Filled(entry) => {
                        let entry: Arc<Entry> = Arc::from(entry);
                        lead.land(Landing::Response(entry.clone()));
                        let status = CacheStatus::collapsed(fwd, entry.status.as_u16());
                        return Ok(entry_response(
                            unwrap_arc(entry),
                            false,
                            status,
                            true,
                            Some(&request_headers),
                        ));
                    }
                    Remote::Leased => Lease::Held,
                    Remote::TimedOut => {
                        let now_ms = unix_ms(SystemTime::now());
                        if let Some(stale) = stale
                            .as_ref()
                            .filter(|s| s.in_grace(now_ms) || s.usable_on_error(now_ms))
                        {
                            lead.land(Landing::Response(stale.clone()));
                            return Ok(stale_response(stale, "wait-timeout"));
                        }
                        Lease::Elsewhere
                    }
                }
            }
            Err(err) => {
                store_failed(&shared, &key, &err, "taking a lease");
                Lease::Unknown
            }
        }
    };

    // Another process may have filled the key between our lookup and our
    // lease: read it once more before paying for a rebuild -- unless the
    // request's own directives (`no-cache`, `max-age`) ruled stored
    // responses out.
    if lease == Lease::Held && fwd != Fwd::Request {
        if let Some(entry) = read_usable(&shared, &key, &request_headers, (&facts, keyed)).await {
            release(&shared, &key, &token).await;
            let entry = Arc::new(entry);
            lead.land(Landing::Response(entry.clone()));
            let status =
                CacheStatus::hit(entry.ttl_ms(unix_ms(SystemTime::now())).div_euclid(1000));
            return Ok(entry_response(
                unwrap_arc(entry),
                false,
                status,
                true,
                Some(&request_headers),
            ));
        }
    }

    // The local waiters' patience is timed from here: this process's own
    // call to the inner service.
    lead.restart_clock();
    let started = Instant::now();
    let stale_on_error = stale
        .as_ref()
        .is_some_and(|s| s.usable_on_error(unix_ms(SystemTime::now())));
    let ctx = Context {
        shared: &shared,
        overrides: &overrides,
        facts: &facts,
        request_headers: &request_headers,
        started,
        current: stale.as_deref(),
        stale_on_error,
    };
    let rebuild = rebuild(ctx, svc, req);
    let rebuilt = extend_while(&shared, &key, &token, lease == Lease::Held, rebuild).await;

    match rebuilt {
        Rebuilt::Failed(err) => {
            if lease == Lease::Held {
                release(&shared, &key, &token).await;
            }
            if let Some(stale) = stale.filter(|_| stale_on_error) {
                lead.land(Landing::Response(stale.clone()));
                return Ok(stale_response(&stale, "stale-if-error"));
            }
            // Waiters join again; one of them leads the next attempt, so a
            // failing origin sees one request at a time, not a stampede.
            drop(lead);
            Err(err)
        }
        Rebuilt::OriginError(mut response) => {
            if lease == Lease::Held {
                release(&shared, &key, &token).await;
            }
            let Some(stale) = stale else {
                // Not reached: `OriginError` needs a usable stale entry.
                lead.land(Landing::Retry);
                return Ok(response);
            };
            lead.land(Landing::Response(stale.clone()));
            let mut status_line = CacheStatus::forward(Fwd::Stale);
            status_line.fwd_status = Some(response.status().as_u16());
            // The failed response's body is dropped unread.
            drop(std::mem::replace(
                response.body_mut(),
                FenceBody::cached(Bytes::new(), None),
            ));
            Ok(stale_response_with(&stale, status_line, "stale-if-error"))
        }
        Rebuilt::Storable(entry, tags, origin_status) => {
            let sets = invalidate::fill_sets(&shared, &path, &tags, &overrides.tags);
            let stored = match lease {
                Lease::Held => {
                    fill(
                        &shared,
                        &base,
                        &key,
                        &entry,
                        Some(&token),
                        &sets,
                        &overrides.declared_vary,
                    )
                    .await
                }
                Lease::Unknown => {
                    fill(
                        &shared,
                        &base,
                        &key,
                        &entry,
                        None,
                        &sets,
                        &overrides.declared_vary,
                    )
                    .await
                }
                Lease::Elsewhere => false,
            };
            shared.hit_for_miss.invalidate(key.as_str());
            let entry = Arc::new(entry);
            lead.land(Landing::Response(entry.clone()));
            let status = CacheStatus {
                fwd_status: Some(origin_status.as_u16()),
                stored,
                detail: store_failure,
                ..CacheStatus::forward(fwd)
            };
            Ok(entry_response(
                unwrap_arc(entry),
                false,
                status,
                false,
                Some(&request_headers),
            ))
        }
        Rebuilt::SharedError(entry) => {
            if lease == Lease::Held {
                release(&shared, &key, &token).await;
            }
            let entry = Arc::new(entry);
            lead.land(Landing::Response(entry.clone()));
            let status = CacheStatus {
                fwd_status: Some(entry.status.as_u16()),
                detail: Some(store_failure.unwrap_or("status")),
                ..CacheStatus::forward(fwd)
            };
            Ok(entry_response(
                unwrap_arc(entry),
                false,
                status,
                false,
                Some(&request_headers),
            ))
        }
        Rebuilt::Unshared {
            mut response,
            reason,
            remember,
        } => {
            if lease == Lease::Held {
                release(&shared, &key, &token).await;
            }
            if remember {
                // Hit-for-miss: the next requests for this key go straight
                // to the origin instead of queueing behind a leader whose
                // answer they could not have.
                shared.hit_for_miss.insert(key.as_str().to_owned(), ());
                lead.land(Landing::Uncacheable);
            } else {
                lead.land(Landing::Retry);
            }
            let status = CacheStatus {
                fwd_status: Some(response.status().as_u16()),
                detail: Some(store_failure.unwrap_or(reason)),
                ..CacheStatus::forward(fwd)
            };
            status.append_to(response.headers_mut());
            Ok(response)
        }
    }
}

/// Refreshes an entry in the background (XFetch or grace): only under the
/// lease, so one refresh runs in the whole fleet; the old entry stays
/// unless the new one may be stored.
pub(crate) async fn refresh<S, B, RB>(job: Job<S, B>)
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body,
{
    let Job {
        shared,
        key,
        base,
        lead,
        svc,
        mut req,
        stale,
        overrides,
        authorized,
        ..
    } = job;
    let Prepared {
        request_headers,
        path,
        lease_sets,
        token,
    } = prepare(&shared, &mut req);
    match take_lease(&shared, &key, &token, &lease_sets).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(err) => {
            store_failed(&shared, &key, &err, "taking a refresh lease");
            return;
        }
    }
    Counters::bump(&shared.counters.refreshes);
    let started = Instant::now();
    let facts = credentials(&shared, authorized, &request_headers);
    let ctx = Context {
        shared: &shared,
        overrides: &overrides,
        facts: &facts,
        request_headers: &request_headers,
        started,
        current: stale.as_deref(),
        stale_on_error: true,
    };
    let rebuild = rebuild(ctx, svc, req);
    match extend_while(&shared, &key, &token, true, rebuild).await {
        Rebuilt::Storable(entry, tags, _) => {
            let sets = invalidate::fill_sets(&shared, &path, &tags, &overrides.tags);
            fill(
                &shared,
                &base,
                &key,
                &entry,
                Some(&token),
                &sets,
                &overrides.declared_vary,
            )
            .await;
            lead.land(Landing::Response(Arc::new(entry)));
        }
        _ => {
            // The origin failed or the response may not be stored: keep
            // serving what is there.
            release(&shared, &key, &token).await;
        }
    }
}

/// What a rebuild keeps of the client's request before turning it into
/// the request it sends, and the token of its lease.
struct Prepared {
    /// The client's headers: for `Vary` and the client's own validators.
    request_headers: HeaderMap,
    path: String,
    /// The index sets the lease joins.
    lease_sets: Vec<String>,
    token: String,
}

fn prepare<B>(shared: &Shared, req: &mut Request<B>) -> Prepared {
    let request_headers = req.headers().clone();
    let path = req.uri().path().to_owned();
    let lease_sets = invalidate::lease_sets(shared, &path);
    prepare_rebuild_request(req);
    Prepared {
        request_headers,
        path,
        lease_sets,
        token: new_token(),
    }
}

/// Takes the key's rebuild lease, bounded by the store timeout.
async fn take_lease(
    shared: &Shared,
    key: &CacheKey,
    token: &str,
    lease_sets: &[String],
) -> Result<bool, crate::StoreError> {
    let lease = shared
        .store
        .try_lease(key.as_str(), token, shared.lease_ttl, lease_sets);
    with_timeout(shared.store_timeout, lease).await
}

/// The request a rebuild sends: a `GET` (a refresh may start from a `HEAD`)
/// without the client's validators, since its answer is for everyone.
fn prepare_rebuild_request<B>(req: &mut Request<B>) {
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
}

/// What became of a rebuild.
enum Rebuilt<RB: Body, E> {
    /// The inner service failed.
    Failed(E),
    /// The origin answered 5xx and a stale entry may be served instead.
    OriginError(Response<FenceBody<RB>>),
    /// A complete, storable response, its tags, and the status the origin
    /// answered with (`304` for a revalidation).
    Storable(Entry, Vec<String>, StatusCode),
    /// A complete error response that all waiters may be given, not stored.
    SharedError(Entry),
    /// A response only the leader's client may have. `remember`: the key
    /// is likely to stay uncacheable (hit-for-miss).
    Unshared {
        response: Response<FenceBody<RB>>,
        reason: &'static str,
        remember: bool,
    },
}

/// What a rebuild knows besides the request: the route's settings, whether
/// the request carried credentials, and the stale entry to revalidate.
struct Context<'a> {
    shared: &'a Shared,
    overrides: &'a Overrides,
    /// The request's credentials (`authorized`, `cookie`).
    facts: &'a RequestFacts,
    request_headers: &'a HeaderMap,
    started: Instant,
    /// The stored entry this rebuild replaces: its validators go to the
    /// origin, and a `304` refreshes it.
    current: Option<&'a Entry>,
    stale_on_error: bool,
}

async fn rebuild<S, B, RB>(
    ctx: Context<'_>,
    mut svc: S,
    mut req: Request<B>,
) -> Rebuilt<RB, S::Error>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body,
{
    let shared = ctx.shared;
    // Revalidate (RFC 9111 §4.3.1) when the entry has validators.
    if let Some(current) = ctx.current {
        for (name, value) in validation::conditional_headers(current) {
            req.headers_mut().insert(name, value);
        }
    }
    let response = match svc.call(req).await {
        Ok(response) => response,
        Err(err) => return Rebuilt::Failed(err),
    };
    let (mut parts, body) = response.into_parts();
    if ctx.overrides.strip_set_cookie {
        parts.headers.remove(header::SET_COOKIE);
    }
    let tags = invalidate::tags(shared, &parts.headers);
    invalidate::strip_tags(shared, &mut parts.headers);
    if parts.status.is_server_error() && ctx.stale_on_error {
        return Rebuilt::OriginError(Response::from_parts(parts, FenceBody::passthrough(body)));
    }
    if parts.status == StatusCode::NOT_MODIFIED {
        if let Some(current) = ctx.current {
            // RFC 9111 §4.3.4: the stored response, with the 304's headers.
            drop(body);
            return refreshed(&ctx, current, &parts.headers, tags);
        }
    }
    let max = shared.max_body_size;
    let verdict = policy::storability(
        &shared.policy,
        ctx.overrides,
        parts.status,
        &parts.headers,
        ctx.facts,
        SystemTime::now(),
    );
    let shareable_error = match verdict {
        Err(reason) => {
            parts.status.is_server_error()
                && !matches!(
                    reason,
                    "private"
                        | "no-store"
                        | "set-cookie"
                        | "vary-star"
                        | "authorization"
                        | "cookie"
                        | "cache-control"
                )
        }
        Ok(_) => false,
    };
    if verdict.is_err() && !shareable_error {
        let reason = verdict.err().unwrap_or("uncacheable");
        return Rebuilt::Unshared {
            response: Response::from_parts(parts, FenceBody::passthrough(body)),
            reason,
            remember: true,
        };
    }
    if body.size_hint().lower() > max as u64 {
        return Rebuilt::Unshared {
            response: Response::from_parts(parts, FenceBody::passthrough(body)),
            reason: "too-large",
            remember: true,
        };
    }
    let (data, trailers) = match read_body(Box::pin(body), max).await {
        Read::Complete { data, trailers } => (data, trailers),
        Read::Overflow { prefix, rest } => {
            return Rebuilt::Unshared {
                response: Response::from_parts(parts, FenceBody::replay(prefix, Some(rest), None)),
                reason: "too-large",
                remember: true,
            }
        }
        Read::Failed { prefix, error } => {
            return Rebuilt::Unshared {
                response: Response::from_parts(parts, FenceBody::replay(prefix, None, Some(error))),
                reason: "body-error",
                remember: false,
            }
        }
    };
    let headers = policy::storable_headers(&parts.headers);
    match verdict {
        Ok(freshness) => {
            let names = policy::vary_names(&parts.headers).unwrap_or_default();
            let vary = vary_values(&names, ctx.request_headers);
            let entry = Entry::new(
                parts.status,
                headers,
                data,
                trailers,
                &freshness,
                ctx.started,
                vary,
            );
            Rebuilt::Storable(entry, tags, parts.status)
        }
        Err(_) => {
            let expired = Freshness::expired(unix_ms(SystemTime::now()));
            let entry = Entry::new(
                parts.status,
                headers,
                data,
                trailers,
                &expired,
                ctx.started,
                Vec::new(),
            );
            Rebuilt::SharedError(entry)
        }
    }
}

/// The entry a `304 Not Modified` revalidated: its body, the merged
/// headers, freshness anew from them.
fn refreshed<RB: Body, E>(
    ctx: &Context<'_>,
    current: &Entry,
    not_modified: &HeaderMap,
    tags: Vec<String>,
) -> Rebuilt<RB, E> {
    Counters::bump(&ctx.shared.counters.revalidated);
    let merged = policy::storable_headers(&validation::merge_not_modified(
        &current.headers,
        not_modified,
    ));
    let verdict = policy::storability(
        &ctx.shared.policy,
        ctx.overrides,
        current.status,
        &merged,
        ctx.facts,
        SystemTime::now(),
    );
    let storable = verdict.is_ok();
    let freshness = verdict.unwrap_or_else(|_| Freshness::expired(unix_ms(SystemTime::now())));
    let entry = Entry::new(
        current.status,
        merged,
        current.body.clone(),
        current.trailers.clone(),
        &freshness,
        ctx.started,
        current.vary.clone(),
    );
    if storable {
        Rebuilt::Storable(entry, tags, StatusCode::NOT_MODIFIED)
    } else {
        Rebuilt::SharedError(entry)
    }
}

/// A body read up to a cap.
enum Read<B: Body> {
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Past the cap: what was read, and the rest.
    Overflow {
        prefix: Vec<Bytes>,
        rest: Pin<Box<B>>,
    },
    /// The body failed: what was read before.
    Failed { prefix: Vec<Bytes>, error: B::Error },
}

async fn read_body<B: Body>(mut body: Pin<Box<B>>, max: usize) -> Read<B> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let mut trailers: Option<HeaderMap> = None;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                return Read::Failed {
                    prefix: chunks,
                    error,
                }
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                let chunk = data.copy_to_bytes(data.remaining());
                len = len.saturating_add(chunk.len());
                if !chunk.is_empty() {
                    chunks.push(chunk);
                }
                if len > max {
                    return Read::Overflow {
                        prefix: chunks,
                        rest: body,
                    };
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    match &mut trailers {
                        Some(existing) => existing.extend(t),
                        None => trailers = Some(t),
                    }
                }
            }
        }
    }
    let data = concat(chunks, len);
    Read::Complete { data, trailers }
}

/// Runs `work`, extending the lease every third of its TTL while it runs.
async fn extend_while<F: Future>(
    shared: &Shared,
    key: &CacheKey,
    token: &str,
    held: bool,
    work: F,
) -> F::Output {
    if !held {
        return work.await;
    }
    let mut work = pin!(work);
    let period = (shared.lease_ttl / 3).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            out = &mut work => return out,
            () = tokio::time::sleep(period) => {
                let extend = shared.store.extend_lease(key.as_str(), token, shared.lease_ttl);
                match with_timeout(shared.store_timeout, extend).await {
                    Ok(true) => {}
                    Ok(false) => tracing::debug!(key = key.as_str(), "tower-fence: rebuild lease lost"),
                    Err(err) => store_failed(shared, key, &err, "extending a lease"),
                }
            }
        }
    }
}

/// What waiting for another process's rebuild came to.
enum Remote {
    Filled(Box<Entry>),
    /// The other process let go of the lease (it finished without storing,
    /// or died and the lease expired), and this rebuild took it.
    Leased,
    TimedOut,
}

async fn wait_for_remote_fill(
    shared: &Shared,
    lead: &Lead,
    key: &CacheKey,
    token: &str,
    lease_sets: &[String],
    request_headers: &HeaderMap,
    allowed: (&RequestFacts, bool),
) -> Remote {
    Counters::bump(&shared.counters.remote_waits);
    lead.awaiting_remote();
    // Subscribe before reading, so that a fill between the read and the
    // wait still wakes us.
    let mut subscription = shared.store.subscribe_fill(key.as_str());
    let deadline = Instant::now() + shared.wait_timeout;
    loop {
        if let Some(entry) = read_usable(shared, key, request_headers, allowed).await {
            return Remote::Filled(Box::new(entry));
        }
        if let Ok(true) = take_lease(shared, key, token, lease_sets).await {
            return Remote::Leased;
        }
        let now = Instant::now();
        if now >= deadline {
            Counters::bump(&shared.counters.wait_timeouts);
            return Remote::TimedOut;
        }
        let nap = shared.fill_poll_interval.min(deadline - now);
        match subscription.as_mut() {
            Some(subscription) => {
                let _ = tokio::time::timeout(nap, subscription.filled()).await;
            }
            None => tokio::time::sleep(nap).await,
        }
    }
}

/// Reads the key's entry if it is there, decodes, is fresh, matches the
/// request's `Vary` values and may answer a request with `allowed`'s facts
/// and `keyed_by_credential` ([`policy::may_answer`]).
async fn read_usable(
    shared: &Shared,
    key: &CacheKey,
    request_headers: &HeaderMap,
    (facts, keyed_by_credential): (&RequestFacts, bool),
) -> Option<Entry> {
    let record = with_timeout(shared.store_timeout, shared.store.get(key.as_str()))
        .await
        .ok()??;
    let entry = match Record::decode(&record, key.as_str()).ok()? {
        Record::Entry(entry) => entry,
        // The fill was of a varying response: read this request's variant.
        Record::Vary(names) => {
            let variant = key::variant(key, &names, request_headers);
            let record = with_timeout(shared.store_timeout, shared.store.get(variant.as_str()))
                .await
                .ok()??;
            Entry::decode(&record, variant.as_str()).ok()?
        }
    };
    let usable = entry.is_fresh(unix_ms(SystemTime::now()))
        && !entry.has(crate::entry::flags::REVALIDATE)
        && vary_matches(&entry, request_headers)
        && policy::may_answer(&entry, facts, keyed_by_credential);
    usable.then_some(entry)
}

/// Stores `entry` under `key` (the URL's key `base`, or one of its
/// variants), fenced by `token` when given, joining `sets`; `true` when
/// stored.
///
/// A response that varies, stored under the URL's own key, goes to its
/// variant's key, and the URL's key gets a vary stub naming the headers. The
/// variant is written first and the stub, fenced by the lease, second: if
/// the lease was lost meanwhile the variant is removed again, so an
/// invalidation during the rebuild leaves nothing behind.
pub(crate) async fn fill(
    shared: &Shared,
    base: &CacheKey,
    key: &CacheKey,
    entry: &Entry,
    token: Option<&str>,
    sets: &[String],
    declared_vary: &[HeaderName],
) -> bool {
    let ttl = entry.store_ttl(unix_ms(SystemTime::now()), shared.keep_ms());
    let names: Vec<HeaderName> = entry.vary.iter().map(|(name, _)| name.clone()).collect();
    // Headers the route declared to vary on are in the key already.
    if names.iter().all(|name| declared_vary.contains(name)) {
        return write(shared, key, entry.encode(key.as_str()), ttl, token, sets).await;
    }
    let stub = Record::encode_vary(&names, base.as_str());
    if key != base {
        // Already the variant's key (the stub was found): refresh the stub.
        let record = entry.encode(key.as_str());
        let stored = write(shared, key, record, ttl, token, sets).await;
        if stored {
            write(shared, base, stub, ttl, None, &[]).await;
        }
        return stored;
    }
    let request_values: HeaderMap = entry
        .vary
        .iter()
        .filter_map(|(name, value)| Some((name.clone(), value.clone()?)))
        .collect();
    let variant = key::variant(base, &names, &request_values);
    let record = entry.encode(variant.as_str());
    if !write(shared, &variant, record, ttl, None, sets).await {
        return false;
    }
    // The stub joins no set: an invalidation removes the variants (they
    // joined the sets), and a stub whose variant is gone is a vary-miss.
    if write(shared, base, stub, ttl, token, &[]).await {
        return true;
    }
    let _ = with_timeout(shared.store_timeout, shared.store.delete(variant.as_str())).await;
    false
}

async fn write(
    shared: &Shared,
    key: &CacheKey,
    record: Bytes,
    ttl: Duration,
    token: Option<&str>,
    sets: &[String],
) -> bool {
    let mut fill = StoreFill::new(key.as_str(), record, ttl).joining(sets);
    if let Some(token) = token {
        fill = fill.fenced_by(token);
    }
    let result = with_timeout(shared.store_timeout, shared.store.fill(fill)).await;
    match result {
        Ok(true) => {
            Counters::bump(&shared.counters.stores);
            true
        }
        Ok(false) => {
            Counters::bump(&shared.counters.fenced_out);
            tracing::debug!(
                key = key.as_str(),
                "tower-fence: lease lost during the rebuild; not stored"
            );
            false
        }
        Err(err) => {
            store_failed(shared, key, &err, "storing a response");
            false
        }
    }
}

async fn release(shared: &Shared, key: &CacheKey, token: &str) {
    let release = shared.store.release_lease(key.as_str(), token);
    if let Err(err) = with_timeout(shared.store_timeout, release).await {
        store_failed(shared, key, &err, "releasing a lease");
    }
}

fn store_failed(shared: &Shared, key: &CacheKey, err: &crate::StoreError, doing: &'static str) {
    Counters::bump(&shared.counters.store_errors);
    tracing::warn!(key = key.as_str(), error = %err, "tower-fence: {doing} failed");
}

fn stale_response<RB: Body>(stale: &Arc<Entry>, detail: &'static str) -> Response<FenceBody<RB>> {
    let ttl = stale.ttl_ms(unix_ms(SystemTime::now())).div_euclid(1000);
    stale_response_with(stale, CacheStatus::stale(ttl, detail), detail)
}

fn stale_response_with<RB: Body>(
    stale: &Arc<Entry>,
    mut status: CacheStatus,
    detail: &'static str,
) -> Response<FenceBody<RB>> {
    status.ttl = Some(stale.ttl_ms(unix_ms(SystemTime::now())).div_euclid(1000));
    status.detail = Some(detail);
    entry_response(Entry::clone(stale), false, status, true, None)
}

fn unwrap_arc(entry: Arc<Entry>) -> Entry {
    Arc::try_unwrap(entry).unwrap_or_else(|shared| Entry::clone(&shared))
}
